"""The openai backend against a real local HTTP server (tests/openai_server) over the tiny
model: equality with the hf backend, fault injection, retries, failures, the API key."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import RunAligned
from selfalign.backends import (
    Backend,
    BackendConfig,
    GenerationRequest,
    SamplingParams,
    ScoreRequest,
    load_backend,
)
from selfalign.backends.hf import HFBackend
from selfalign.config import RunConfig, StageConfig
from selfalign.errors import InputError
from selfalign.pipeline import Runner, StageIncomplete
from selfalign.stages.api import Batch, MapWork, Stage, StageContext
from selfalign.store import read_records, record_id

pytest.importorskip("fastapi", reason="the test server needs the dev extra (fastapi)")
pytest.importorskip("uvicorn", reason="the test server needs the dev extra (uvicorn)")

from openai_server import FaultSchedule, RunningServer, serve  # noqa: E402

KEY = "sk-selfalign-test-9f1c2e7b"  # a made-up key; it must never reach a file
ENV = "SELFALIGN_TEST_API_KEY"
PREFIX = "Answer the question in a few words.\n\n"
N_STAGE = 200
NGRAM = ((3, 1.0), (4, 2.0))
FAULTS = 0.2


def questions(n: int) -> list[str]:
    return [f"Question {i}: what comes after {i * 7}?\nAnswer:" for i in range(n)]


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, KEY)


@pytest.fixture(scope="module")
def hf(varied_tiny_model: Path) -> HFBackend:
    return HFBackend(varied_tiny_model, batch_size=8)


@pytest.fixture(scope="module")
def server(varied_tiny_model: Path) -> Iterator[RunningServer]:
    with serve(varied_tiny_model, api_key=KEY) as running:
        yield running


def backend_for(*servers: RunningServer, **settings: object) -> Backend:
    settings = {"api_key_env": ENV, "retry_backoff_s": 0.01, "timeout_s": 30.0, **settings}
    extra = [s.url for s in servers[1:]]
    return load_backend(BackendConfig(model=servers[0].spec(), base_urls=extra, **settings))


def joined(req: GenerationRequest) -> GenerationRequest:
    """What a completion server sees: prefix and prompt as one string."""
    return GenerationRequest(prompt=req.prefix + req.prompt, params=req.params, seed=req.seed)


# -- equality with the hf backend ---------------------------------------------------------
def test_greedy_completions_and_chat_match_hf(hf: HFBackend, server: RunningServer) -> None:
    params = SamplingParams(max_new_tokens=12, stop=("\n",))
    prefix = "You answer questions about numbers, briefly and correctly.\n\n" * 6
    reqs = [GenerationRequest(prompt=q, prefix=prefix, params=params) for q in questions(12)]
    prefilled = server.model_stats.prefill_tokens
    chats = [
        GenerationRequest(prompt="", params=SamplingParams(max_new_tokens=10), messages=(
            {"role": "system", "content": "You judge answers."},
            {"role": "user", "content": f"Is {i} even? Reply yes or no."},
        ))
        for i in range(4)
    ]  # fmt: skip
    with backend_for(server) as backend:
        got = backend.generate(reqs + chats)
    want = hf.generate([joined(r) for r in reqs] + chats)
    assert [g.text for g in got] == [w.text for w in want]
    assert [g.finish_reason for g in got] == [w.finish_reason for w in want]
    assert len({w.text for w in want}) > 8, "outputs should differ between prompts"
    assert backend.stats.requests == 16
    assert backend.stats.completion_tokens == sum(w.completion_tokens for w in want)
    assert backend.stats.prompt_tokens == sum(w.prompt_tokens for w in want)
    # The server reused the shared prefix's KV (as vLLM's prefix caching would) and
    # still matched the hf backend's uncached output.
    assert server.model_stats.prefill_tokens - prefilled < backend.stats.prompt_tokens / 2


def test_seeded_sampling_matches_hf(hf: HFBackend, server: RunningServer) -> None:
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.95)
    reqs = [
        GenerationRequest(prompt=q, params=params, seed=100 + i) for i, q in enumerate(questions(6))
    ]
    reseeded = [GenerationRequest(prompt=r.prompt, params=params, seed=r.seed + 1) for r in reqs]
    with backend_for(server) as backend:
        got = [r.text for r in backend.generate(reqs + reseeded)]
    assert got[:6] == [r.text for r in hf.generate(reqs)]
    assert got[:6] != got[6:], "a different seed should give different samples"


def test_logit_bias_by_text_needs_the_tokenizer(
    hf: HFBackend, server: RunningServer, varied_tiny_model: Path
) -> None:
    params = SamplingParams(max_new_tokens=4, logit_bias={" yes": 100.0})
    reqs = [GenerationRequest(prompt=q, params=params) for q in questions(3)]
    with backend_for(server, tokenizer=str(varied_tiny_model)) as backend:
        got = [r.text for r in backend.generate(reqs)]
    assert got == [r.text for r in hf.generate(reqs)]
    assert all(t.startswith(" yes") for t in got)
    with backend_for(server) as backend, pytest.raises(InputError, match="tokenizer"):
        backend.generate(reqs)


def test_ngram_rules_are_refused_clearly_by_a_plain_server(server: RunningServer) -> None:
    """Only a `vllm serve` with our logits processor can apply the n-gram rules (tested
    against a real one in test_backend_vllm.py); anywhere else they are refused before
    anything is sent."""
    calls = server.traffic.calls
    for params in (SamplingParams(no_repeat_ngram_size=3), SamplingParams(ngram_penalties=NGRAM)):
        with (
            backend_for(server) as backend,
            pytest.raises(InputError, match="server_no_repeat_ngram"),
        ):
            backend.generate([GenerationRequest(prompt="hi", params=params)])
    assert server.traffic.calls == calls, "refused before sending anything"


def test_ngram_rules_through_vllm_xargs_match_hf(hf: HFBackend, server: RunningServer) -> None:
    """Sent as `vllm_xargs` (the test server applies them as our vLLM processor does).
    Only generated tokens count, so no tokenizer is needed to find where the prompt ends."""
    params = SamplingParams(max_new_tokens=48, no_repeat_ngram_size=1, ngram_penalties=NGRAM)
    prefix = "You answer questions about numbers, briefly and correctly.\n\n"
    reqs = [GenerationRequest(prompt=q, prefix=prefix, params=params) for q in questions(6)]
    with backend_for(server, server_no_repeat_ngram=True) as backend:
        assert backend._body(reqs[0])["extra_body"]["vllm_xargs"] == {
            "no_repeat_ngram_size": 1, "ngram_penalties": "3:1.0,4:2.0"
        }  # fmt: skip
        got = [r.text for r in backend.generate(reqs)]
    assert got == [r.text for r in hf.generate([joined(r) for r in reqs])]
    plain = [GenerationRequest(prompt=prefix + q, params=SamplingParams(max_new_tokens=48))
             for q in questions(6)]  # fmt: skip
    assert got != [r.text for r in hf.generate(plain)], "the rules should change outputs"


SCORES = [
    ScoreRequest("The capital of France is", " Paris"),
    ScoreRequest("Question: 2 + 2 = ", "4"),  # trailing space moves to the continuation
    ScoreRequest("", "hello there"),  # empty context: conditioned on BOS only
    ScoreRequest("Über den", " Wolken, straße"),
]


@pytest.mark.parametrize("with_tokenizer", [True, False], ids=["token-ids", "text"])
def test_score_matches_hf(
    hf: HFBackend, server: RunningServer, varied_tiny_model: Path, with_tokenizer: bool
) -> None:
    tokenizer = str(varied_tiny_model) if with_tokenizer else None
    with backend_for(server, tokenizer=tokenizer) as backend:
        got = backend.score(SCORES)
    want = hf.score(SCORES)
    assert got == pytest.approx(want, abs=1e-4)
    assert len(set(want)) == len(want)


def test_score_on_a_server_without_echo_is_a_clear_error(varied_tiny_model: Path) -> None:
    with (
        serve(varied_tiny_model, support_echo=False) as bare,
        backend_for(bare) as backend,
        pytest.raises(InputError, match="echo"),
    ):
        backend.score(SCORES[:1])


# -- faults, retries, failures --------------------------------------------------------------
@pytest.fixture(scope="module")
def stage_reference(hf: HFBackend) -> list[str]:
    params = SamplingParams(max_new_tokens=4)
    return [
        r.text
        for r in hf.generate(
            [GenerationRequest(prompt=q, prefix=PREFIX, params=params) for q in questions(N_STAGE)]
        )
    ]


def test_200_requests_under_20pct_faults_all_come_back_in_order(
    varied_tiny_model: Path, stage_reference: list[str], tmp_path: Path
) -> None:
    faults = FaultSchedule.uniform(FAULTS, seed=1, slow_s=2.5, retry_after_s=0.05)
    params = SamplingParams(max_new_tokens=4)
    reqs = [GenerationRequest(prompt=q, prefix=PREFIX, params=params) for q in questions(N_STAGE)]
    with serve(varied_tiny_model, faults=faults, api_key=KEY) as flaky:
        with backend_for(flaky, timeout_s=2.0, max_retries=10, max_concurrency=8) as backend:
            got = backend.generate(reqs)
        traffic = flaky.traffic
    stats = backend.stats
    assert [r.error for r in got] == [None] * N_STAGE
    assert [r.text for r in got] == stage_reference  # every result at its request's index
    # Every kind of fault happened and each one was retried under its own reason.
    assert set(traffic.faults) == {"rate_limit", "server_error", "drop", "slow", "truncate"}
    reasons = stats.retry_reasons
    assert {"http_429", "http_500", "connection", "timeout", "bad_response"} <= set(reasons)
    assert reasons["http_429"] == traffic.faults["rate_limit"]
    assert reasons["http_500"] == traffic.faults["server_error"]
    assert reasons["bad_response"] == traffic.faults["truncate"]
    assert stats.retries == sum(reasons.values()) and stats.failures == 0
    # Each request was answered at least once; more only where a non-injected timeout
    # (a loaded machine) made the client ask again.
    assert 0 <= traffic.served - N_STAGE <= reasons["timeout"] - traffic.faults["slow"]
    # What a runner would write: results, stats, repr. The key is in none of it.
    (tmp_path / "out.json").write_text(
        json.dumps(
            {"results": [r.__dict__ for r in got], "stats": stats.as_dict(), "repr": repr(backend)}
        )
    )
    assert KEY not in (tmp_path / "out.json").read_text()


def test_the_key_stays_out_of_debug_logs(
    varied_tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # the openai client, httpx and uvicorn at their chattiest
    faults = FaultSchedule.uniform(0.5, seed=3, slow_s=3.5)
    reqs = [
        GenerationRequest(prompt=q, params=SamplingParams(max_new_tokens=2)) for q in questions(8)
    ]
    with (
        serve(varied_tiny_model, faults=faults, api_key=KEY) as flaky,
        backend_for(flaky, timeout_s=3.0, max_retries=10) as backend,
    ):
        got = backend.generate(reqs)
    assert all(r.error is None for r in got) and backend.stats.retries > 0
    assert caplog.text and KEY not in caplog.text


def limited_once_seed() -> int:
    """A seed whose first arrival is rate limited and whose second is served."""
    return next(
        s for s in range(1000)
        if FaultSchedule(rate_limit=0.5, seed=s).pick(0) == "rate_limit"
        and FaultSchedule(rate_limit=0.5, seed=s).pick(1) is None
    )  # fmt: skip


@pytest.mark.parametrize(
    "as_date,wait",
    [(False, 0.6), (True, 1.0)],
    ids=["retry-after-ms", "retry-after-http-date"],
)
def test_retry_after_is_honoured(varied_tiny_model: Path, as_date: bool, wait: float) -> None:
    """With no backoff of its own, the client still waits as long as the server asks:
    ``retry-after-ms``, or only ``Retry-After`` as an HTTP date (rounded up to the second
    by the server, so the wait is at least ``wait``)."""
    faults = FaultSchedule(
        rate_limit=0.5, seed=limited_once_seed(), retry_after_s=wait, retry_after_date=as_date
    )
    req = GenerationRequest(prompt="hello", params=SamplingParams(max_new_tokens=2))
    with (
        serve(varied_tiny_model, faults=faults) as limited,
        backend_for(limited, retry_backoff_s=0.0) as backend,
    ):
        t0 = time.monotonic()
        [result] = backend.generate([req])
        elapsed = time.monotonic() - t0
        assert limited.traffic.calls == 2
    assert result.error is None
    assert backend.stats.retry_reasons == {"http_429": 1}
    assert wait <= elapsed < 20  # a misread date would wait MAX_BACKOFF_S (30 s)


@pytest.mark.parametrize(
    "status,should_retry,calls",
    [(500, None, 3), (500, False, 1), (400, None, 1), (400, True, 3)],
    ids=["500", "500-should-retry-false", "400", "400-should-retry-true"],
)
def test_x_should_retry_overrides_the_status(
    varied_tiny_model: Path, status: int, should_retry: bool | None, calls: int
) -> None:
    faults = FaultSchedule(server_error=1.0, error_status=status, should_retry=should_retry)
    req = GenerationRequest(prompt="hello", params=SamplingParams(max_new_tokens=2))
    with serve(varied_tiny_model, faults=faults) as failing:
        with backend_for(failing, max_retries=2) as backend:
            [result] = backend.generate([req])
        assert failing.traffic.calls == calls
    assert result.finish_reason == "error" and result.error is not None
    assert result.error.startswith(f"http_{status}")
    assert ("after 2 retries" in result.error) is (calls > 1)
    assert backend.stats.retries == calls - 1 and backend.stats.failures == 1


def test_a_request_that_keeps_failing_comes_back_as_an_error(varied_tiny_model: Path) -> None:
    reqs = [
        GenerationRequest(prompt=q, params=SamplingParams(max_new_tokens=2)) for q in questions(3)
    ]
    with serve(varied_tiny_model, faults=FaultSchedule(server_error=1.0)) as broken:
        with backend_for(broken, max_retries=2) as backend:
            got = backend.generate(reqs)
        assert broken.traffic.calls == 9
    assert [r.finish_reason for r in got] == ["error"] * 3
    assert all(
        r.error and r.error.startswith("http_500") and "after 2 retries" in r.error for r in got
    )
    assert backend.stats.failures == 3
    assert backend.stats.retries == 6


def test_a_wrong_key_is_a_clear_input_error_that_does_not_show_it(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV, "sk-wrong-key-0000")
    with backend_for(server) as backend, pytest.raises(InputError) as err:
        backend.generate([GenerationRequest(prompt="hi", params=SamplingParams(max_new_tokens=2))])
    assert ENV in str(err.value)
    assert "sk-wrong-key-0000" not in str(err.value) and "sk-wrong-key-0000" not in repr(backend)


def test_models_endpoint_lists_the_model_behind_the_key(server: RunningServer) -> None:
    import httpx

    listed = httpx.get(f"{server.url}/models", headers={"Authorization": f"Bearer {KEY}"})
    assert [m["id"] for m in listed.json()["data"]] == [server.model_name]
    assert httpx.get(f"{server.url}/models").status_code == 401


def test_requests_spread_over_base_urls_and_avoid_a_failing_one(
    hf: HFBackend, varied_tiny_model: Path
) -> None:
    reqs = [
        GenerationRequest(prompt=q, params=SamplingParams(max_new_tokens=3)) for q in questions(16)
    ]
    with (
        serve(varied_tiny_model, api_key=KEY) as first,
        serve(varied_tiny_model, api_key=KEY) as second,
        serve(varied_tiny_model, api_key=KEY, faults=FaultSchedule(server_error=1.0)) as broken,
    ):
        with backend_for(first, second, broken, max_concurrency=2, max_retries=4) as backend:
            got = backend.generate(reqs)
        assert first.traffic.served > 0 and second.traffic.served > 0
        assert first.traffic.served + second.traffic.served == 16
        assert broken.traffic.calls > 0
    assert [r.text for r in got] == [r.text for r in hf.generate(reqs)]
    assert backend.stats.retry_reasons.get("http_500") == broken.traffic.calls


def test_scripted_chat_handler_for_judge_tests(varied_tiny_model: Path) -> None:
    seen: list[list[dict[str, str]]] = []

    def judge(messages: list[dict[str, str]], body: dict) -> str:
        seen.append(messages)
        return f"Verdict: {len(messages[-1]['content'])}"

    reqs = [
        GenerationRequest(prompt="", messages=({"role": "user", "content": "x" * n},))
        for n in (3, 1, 2)
    ]
    with serve(varied_tiny_model, chat_handler=judge) as scripted, backend_for(scripted) as backend:
        got = [r.text for r in backend.generate(reqs)]
    assert got == ["Verdict: 3", "Verdict: 1", "Verdict: 2"]
    assert sorted(len(m[0]["content"]) for m in seen) == [1, 2, 3]


# -- config ---------------------------------------------------------------------------------
def test_config_keeps_execution_settings_out_of_fingerprints() -> None:
    base = BackendConfig(model="openai:http://a:8000/v1#m")
    tuned = BackendConfig(
        model="openai:http://a:8000/v1#m", base_urls=["http://b:8000/v1"], max_concurrency=64,
        timeout_s=5, max_retries=1, retry_backoff_s=3, api_key_env="OTHER_KEY",
    )  # fmt: skip
    assert base.fingerprint_data() == tuned.fingerprint_data()
    assert (
        BackendConfig(model=base.model, tokenizer="/tok").fingerprint_data()
        != base.fingerprint_data()
    )
    assert "EXECUTION_ONLY" not in base.model_dump()
    with pytest.raises(ValueError, match="extra"):
        BackendConfig(model=base.model, api_key=KEY)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        BackendConfig(model=base.model, base_urls=["b:8000"])
    with pytest.raises(ValueError):
        BackendConfig(model=base.model, api_key_env="sk-not-a-variable-name")


# -- a generation stage through the real runner ---------------------------------------------
class QuestionsConfig(StageConfig):
    n: int = 200
    chunk_size: int = 50


def run_questions(ctx: StageContext) -> Iterator[MapWork]:
    """A minimal generation stage, written like stage 2: requests that failed after all
    retries go to ``Batch.failed`` (not committed), everything else is kept."""
    cfg: QuestionsConfig = ctx.config  # type: ignore[assignment]
    params = SamplingParams(max_new_tokens=4)

    def ask(chunk: list[tuple[str, tuple[int, str]]]) -> Batch:
        reqs = [
            GenerationRequest(prompt=text, prefix=PREFIX, params=params, seed=ctx.seed_for(i))
            for _, (i, text) in chunk
        ]
        batch = Batch()
        for (rid, (i, _)), result in zip(chunk, ctx.backend().generate(reqs), strict=True):
            record = {"id": rid, "index": i, "text": result.text}
            if result.error is None:
                batch.keep.append(record)
            else:
                batch.failed.append((record, result.error))
        return batch

    items = {record_id("question", t): (i, t) for i, t in enumerate(questions(cfg.n))}
    yield MapWork(items, cfg.chunk_size, ask)


def run_stage(
    run_dir: Path,
    server: RunningServer,
    model: Path,
    n: int = N_STAGE,
    **settings: object,
) -> Runner:
    the_stage = Stage("questions", QuestionsConfig, run_questions)
    backend = BackendConfig(
        model=server.spec(),
        api_key_env=ENV,
        retry_backoff_s=0.01,
        **settings,  # type: ignore[arg-type]
    )
    run = RunConfig(model=str(model), backend=backend)
    runner = Runner(run, {"questions": QuestionsConfig(n=n)}, run_dir, run_dir / "config.yaml",
                    stages={"questions": the_stage})  # fmt: skip
    runner.execute(runner.plan())
    return runner


def test_stage_2_of_200_under_20pct_faults_through_the_runner(
    varied_tiny_model: Path, tmp_path: Path, run_aligned: RunAligned
) -> None:
    """The real ``aligned`` stage on the openai backend: only the backend block changes
    (plus ``tokenizer``, as stage 2 biases "Sorry" by text)."""
    run_dir = tmp_path / "run"
    faults = FaultSchedule.uniform(FAULTS, seed=2, slow_s=2.5, retry_after_s=0.05)
    with serve(varied_tiny_model, faults=faults, api_key=KEY) as flaky:
        block = BackendConfig(
            model=flaky.spec(), api_key_env=ENV, tokenizer=str(varied_tiny_model),
            timeout_s=2.0, max_retries=10, max_concurrency=8, retry_backoff_s=0.01,
        )  # fmt: skip
        prompts = run_aligned(
            block, varied_tiny_model, run_dir, questions(N_STAGE), max_new_tokens=4, chunk_size=50
        )
    kept = read_records(run_dir / "aligned" / "records.jsonl")
    dropped = read_records(run_dir / "aligned" / "dropped.jsonl")
    ids = [r["id"] for r in kept + dropped]
    assert len(ids) == N_STAGE and len(set(ids)) == N_STAGE
    assert {r["prompt_id"] for r in kept + dropped} == {p["id"] for p in prompts}
    entry = json.loads((run_dir / "manifest.json").read_text())["stages"]["aligned"]
    assert entry["status"] == "complete"
    assert "backend_error" not in entry["drop_reasons"]
    usage = entry["usage"]
    assert usage["retries"] > 0 and usage["failures"] == 0 and usage["requests"] == N_STAGE
    assert {"http_429", "http_500", "connection", "timeout", "bad_response"} <= set(
        usage["retry_reasons"]
    )
    assert usage["completion_tokens"] > 0 and usage["prompt_tokens"] > 0
    # The key is nowhere under the run directory; the variable's name is in config.yaml.
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert files and not [p for p in files if KEY.encode() in p.read_bytes()]
    assert ENV in (run_dir / "config.yaml").read_text()


def test_requests_that_failed_are_asked_again_on_resume(
    varied_tiny_model: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    with serve(
        varied_tiny_model, faults=FaultSchedule(server_error=0.3, seed=5), api_key=KEY
    ) as flaky:
        with pytest.raises(StageIncomplete, match="requests failed"):
            run_stage(run_dir, flaky, varied_tiny_model, n=40, max_retries=0)
        first = json.loads((run_dir / "manifest.json").read_text())["stages"]["questions"]
        assert first["status"] == "incomplete"
        assert first["usage"]["failures"] > 0
        assert first["counts"]["failed"] == first["usage"]["failures"]
        assert first["counts"]["out"] == 40 - first["counts"]["failed"]
        # Same settings except retries (execution-only): the stage resumes, not reruns.
        run_stage(run_dir, flaky, varied_tiny_model, n=40, max_retries=10)
    records = [json.loads(line) for line in (run_dir / "questions" / "records.jsonl").open()]
    assert len(records) == 40 and len({r["id"] for r in records}) == 40
    second = json.loads((run_dir / "manifest.json").read_text())["stages"]["questions"]
    assert second["status"] == "complete" and second["counts"]["failed"] == 0
