"""Shared-prefix KV reuse in the hf backend vs plain ``model.generate``.

8 queries share a 1,500-token prefix (stage 2's in-context prompt is like this); each
gets 64 new greedy tokens. Timed in the same run:
  plain   - ``model.generate`` on the 8 full prompts, one left-padded batch;
  reuse   - our backend, prefix prefilled once (first call: prefill included;
            steady state: prefix already cached, as for every later batch of a stage);
  floor   - our backend on the queries alone, no prefix at all.
Asserts the reuse output equals plain generate's text exactly.

    python benchmarks/prefix_reuse.py [--prefix-tokens 1500] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from selfalign.backends import GenerationRequest, SamplingParams
from selfalign.backends.hf import HFBackend
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


def plain_generate(backend: HFBackend, prefix: str, new_tokens: int) -> list[str]:
    rows = [backend.head_ids + backend.encode(prefix + q) for q in QUERIES]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), backend.pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    with torch.no_grad():
        out = backend.model.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
            pad_token_id=backend.pad_id,
        )  # fmt: skip
    return [
        backend.tokenizer.decode(o[width:], skip_special_tokens=True).split("</s>")[0] for o in out
    ]


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix-tokens", type=int, default=1500)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", type=Path, help="model dir (default: a fresh tiny model)")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_tiny_model(Path(tmp) / "tiny", seed=0)
        backend = HFBackend(model_dir, batch_size=len(QUERIES))
        prefix = build_prefix(backend, args.prefix_tokens)
        params = SamplingParams(max_new_tokens=args.new_tokens)
        with_prefix = [GenerationRequest(prompt=q, prefix=prefix, params=params) for q in QUERIES]
        no_prefix = [GenerationRequest(prompt=q, params=params) for q in QUERIES]

        def reuse_cold():
            backend._prefix_caches.clear()
            return [r.text for r in backend.generate(with_prefix)]

        t_plain, plain_text = timed(
            lambda: plain_generate(backend, prefix, args.new_tokens), args.repeats
        )
        t_cold, cold_text = timed(reuse_cold, args.repeats)
        t_warm, warm_text = timed(
            lambda: [r.text for r in backend.generate(with_prefix)], args.repeats
        )
        t_floor, _ = timed(lambda: backend.generate(no_prefix), args.repeats)

    assert cold_text == plain_text == warm_text, "prefix reuse changed the greedy output"
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
    print("outputs identical: yes")


if __name__ == "__main__":
    main()
