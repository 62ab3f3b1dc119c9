"""Shared-prefix KV reuse in the hf backend vs plain ``model.generate``.

8 queries share a 1,500-token prefix (stage 2's in-context prompt is like this); each
gets 64 new greedy tokens. Timed in the same run:
  plain   - ``model.generate`` on the 8 full prompts, one left-padded batch;
  reuse   - our backend, prefix prefilled once (first call: prefill included;
            steady state: prefix already cached, as for every later batch of a stage);
  floor   - our backend on the queries alone, no prefix at all.
Reports how many rows equal plain generate's text (float32 sums in another order can flip a
near-tie on a real model; on the tiny model they all do, see tests/test_backend_hf.py).

``--baseline FILE`` also times another version of the backend module on the same model
(e.g. ``git show REV:src/selfalign/backends/hf.py > /tmp/old_hf.py``), prefix cached,
greedy and seeded sampling (temperature 0.7, top-p 0.9), and asserts both versions give
identical results (text, finish reason, token count).

    python benchmarks/prefix_reuse.py [--prefix-tokens 1500] [--new-tokens 64] [--repeats 3]
        [--model DIR] [--baseline FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

from selfalign.backends import GenerationRequest, SamplingParams
from selfalign.backends.hf import HFBackend, load_model_and_tokenizer
from selfalign.backends.sampling import sole_generation_config
from selfalign.tiny import make_tiny_model, shipped_text_files

QUERIES = [
    "What is the boiling point of water at sea level?",
    "Give me a short tip for writing clear emails.",
    "Name two uses of a hash map.",
    "Summarise the plot of a heist film in one line.",
    "How do I reverse a list in Python?",
    "Suggest a name for a grey cat.",
    "Why do leaves change colour in autumn?",
    "What is 17 times 23?",
]


def build_prefix(backend: HFBackend, n_tokens: int) -> str:
    text = " ".join(p.read_text(encoding="utf-8") for p in shipped_text_files()) or "word "
    while len(backend.encode(text)) < n_tokens:
        text += " " + text
    ids = backend.encode(text)[:n_tokens]
    return backend.tokenizer.decode(ids)


def plain_generate(
    backend: HFBackend, prefix: str, new_tokens: int, queries: list[str] = QUERIES
) -> tuple[list[str], int]:
    """``model.generate`` on prefix + query per row, one left-padded batch, greedy, with
    the backend's end-of-sequence ids and no other generation setting of the model's:
    (texts cut at the first end id, completion tokens)."""
    rows = [backend.head_ids + backend.encode(prefix + q) for q in queries]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), backend.pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    config = GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, eos_token_id=sorted(backend.eos_ids),
        pad_token_id=backend.pad_id,
    )  # fmt: skip
    with torch.no_grad(), sole_generation_config(config, backend.model):
        out = backend.model.generate(
            ids.to(backend.device), attention_mask=mask.to(backend.device),
            generation_config=config,
        )  # fmt: skip
    texts, tokens = [], 0
    for row in out[:, width:].tolist():
        ends = [k for k, t in enumerate(row) if t in backend.eos_ids]
        row = row[: ends[0]] if ends else row
        tokens += len(row)
        texts.append(backend.tokenizer.decode(row, skip_special_tokens=True))
    return texts, tokens


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def load_baseline(file: Path, model_dir: Path, ours: HFBackend) -> HFBackend:
    """The ``HFBackend`` of another version of the module, sharing our model weights."""
    spec = importlib.util.spec_from_file_location("baseline_hf", file)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]  # (dataclasses look it up)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.HFBackend(model_dir, model=ours.model, tokenizer=ours.tokenizer,
                            batch_size=ours.batch_size)  # fmt: skip


def compare_baseline(
    ours: HFBackend, baseline: HFBackend, prefix: str, new_tokens: int, repeats: int
) -> None:
    """Steady-state (prefix cached) time of both versions; their results must be identical."""
    cases = {
        "greedy": SamplingParams(max_new_tokens=new_tokens),
        "sampled": SamplingParams(max_new_tokens=new_tokens, temperature=0.7, top_p=0.9),
    }
    for name, params in cases.items():
        reqs = [GenerationRequest(prompt=q, prefix=prefix, params=params, seed=100 + i)
                for i, q in enumerate(QUERIES)]  # fmt: skip
        baseline.generate(reqs), ours.generate(reqs)  # prefill the prefix in both
        times: dict[str, list[float]] = {"baseline": [], "current": []}
        for _ in range(repeats):  # interleaved, so that load from elsewhere hits both alike
            t_base, base = timed(lambda r=reqs: baseline.generate(r), 1)
            t_ours, got = timed(lambda r=reqs: ours.generate(r), 1)
            times["baseline"].append(t_base)
            times["current"].append(t_ours)
        t_base, t_ours = (statistics.median(times[k]) for k in ("baseline", "current"))
        rows = [[(r.text, r.finish_reason, r.completion_tokens) for r in x] for x in (base, got)]
        assert rows[0] == rows[1], f"{name}: the baseline's results differ"
        tokens = sum(r.completion_tokens for r in got)
        print(f"  {name:8s} baseline {t_base:7.3f} s {tokens / t_base:7.1f} tok/s   "
              f"current {t_ours:7.3f} s {tokens / t_ours:7.1f} tok/s   identical: yes")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix-tokens", type=int, default=1500)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", type=Path, help="model dir (default: a fresh tiny model)")
    ap.add_argument("--baseline", type=Path, help="another hf.py to time against (see above)")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_tiny_model(Path(tmp) / "tiny", seed=0)
        model, tokenizer = load_model_and_tokenizer(model_dir)
        backend = HFBackend(model_dir, model=model, tokenizer=tokenizer, batch_size=len(QUERIES))
        prefix = build_prefix(backend, args.prefix_tokens)
        params = SamplingParams(max_new_tokens=args.new_tokens)
        with_prefix = [GenerationRequest(prompt=q, prefix=prefix, params=params) for q in QUERIES]
        no_prefix = [GenerationRequest(prompt=q, params=params) for q in QUERIES]

        def reuse_cold():
            backend._prefix_caches.clear()
            return [r.text for r in backend.generate(with_prefix)]

        t_plain, (plain_text, _) = timed(
            lambda: plain_generate(backend, prefix, args.new_tokens), args.repeats
        )
        t_cold, cold_text = timed(reuse_cold, args.repeats)
        t_warm, warm_text = timed(
            lambda: [r.text for r in backend.generate(with_prefix)], args.repeats
        )
        t_floor, _ = timed(lambda: backend.generate(no_prefix), args.repeats)
        baseline = args.baseline and load_baseline(args.baseline, model_dir, backend)

    assert cold_text == warm_text, "a cached prefix changed the greedy output"
    same = sum(a == b for a, b in zip(cold_text, plain_text, strict=True))
    n_prefix = len(backend.encode(prefix))
    print(
        f"{len(QUERIES)} queries, {n_prefix}-token shared prefix, {args.new_tokens} new tokens, greedy"
    )
    print(f"  plain model.generate      {t_plain:7.3f} s")
    print(
        f"  reuse (prefill included)  {t_cold:7.3f} s   {t_plain / t_cold:5.2f}x faster than plain"
    )
    print(
        f"  reuse (prefix cached)     {t_warm:7.3f} s   {t_plain / t_warm:5.2f}x faster than plain"
    )
    print(f"  floor (no prefix at all)  {t_floor:7.3f} s   reuse/floor = {t_cold / t_floor:4.2f}x")
    # fp32 sums in another order can flip a near-tie on a real model; the tiny model's
    # outputs are equal (tests/test_backend_hf.py)
    print(f"rows identical to plain generate: {same}/{len(cold_text)}")
    if baseline:
        print(f"against {args.baseline} (prefix cached):")
        compare_baseline(backend, baseline, prefix, args.new_tokens, args.repeats)


if __name__ == "__main__":
    main()
