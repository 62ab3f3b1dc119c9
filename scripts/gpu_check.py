"""One-shot GPU speed check on real shapes (issue #17): three measurements, one JSON.

  generate  our hf backend (``HFBackend``: shared prefix prefilled once, static decode
            cache) vs plain ``model.generate`` on the joined prompts, random-init 1B Llama
            (hidden 2048, 16 layers, 32/8 heads, 8192 MLP, 128256 vocab) in bf16, batch
            64, a 1.5k-token shared prefix, greedy; tokens/s of each and their ratio.
            The prompts and both paths are ``benchmarks/prefix_reuse.py``'s.
  lora      a LoRA SFT training step on a random-init 8B Llama (hidden 4096, 32 layers,
            32/8 heads, 14336 MLP, 128256 vocab) in bf16 with gradient checkpointing at
            sequence 1024: our SFT adapter (``lora_config(TrainConfig())``: r=16, alpha 16,
            q/k/v/o), forward + backward + gradient clipping + AdamW under bf16 autocast:
            the step trl's SFTTrainer runs for ``train_sft``, timed as a plain loop (trl is
            not on the GPU machine); seconds/step, tokens/s, peak GiB.
  mote      packed MoTE vs the expanded multi-LoRA baseline (``benchmarks/
            mote_efficiency.py``: one epoch over the same chains with ``train_mote``) at
            the 8B's layer dims on a few layers, bf16; time and FLOPs of each, ratios.

Each part has its own time budget and try/except: a failure or a timeout is an
``error`` entry and the next part still runs; the JSON is rewritten after every part.
The default sizes fit well inside 8 minutes on one H200 (a rough estimate is printed
first); every size is a flag. ``--cpu-smoke`` runs the same code paths with tiny dims
on the CPU (under a minute).

    scripts/gpu_check.sh [--out FILE] [--parts generate,lora,mote] [--cpu-smoke] [...]

(``gpu_check.sh`` installs the wheels ``make gpu-wheels`` put in ``.whl/`` first and puts
``src/`` on PYTHONPATH.) Output: ``$OUT/gpu_check.json`` when ``OUT`` is set, else
``runs/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # prefix_reuse, mote_efficiency

import torch  # noqa: E402

LLAMA_1B = dict(  # Llama 3.2 1B's shape (tied embeddings: 1.24B parameters)
    hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
)  # fmt: skip
LLAMA_8B = dict(
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    intermediate_size=14336, vocab_size=128256,
)  # fmt: skip
TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, vocab_size=8192,  # over the tokenizer's 4096, as on the GPU
)  # fmt: skip

# Sizes and budgets (seconds); every one is a flag. The GPU budgets add up to 7.5 minutes.
PRESETS = {
    "gpu": dict(
        gen_batch=64, gen_prefix_tokens=1536, gen_new_tokens=128, gen_repeats=3,
        gen_layers=LLAMA_1B["num_hidden_layers"],
        lora_batch=4, lora_seq=1024, lora_steps=8, lora_warmup=2,
        lora_layers=LLAMA_8B["num_hidden_layers"],
        mote_layers=4, mote_chains=128, mote_batch=16, mote_vocab=LLAMA_8B["vocab_size"],
        budget_generate=120, budget_lora=120, budget_mote=200, deadline=450,
    ),
    "cpu-smoke": dict(
        gen_batch=4, gen_prefix_tokens=64, gen_new_tokens=8, gen_repeats=1, gen_layers=2,
        lora_batch=2, lora_seq=64, lora_steps=2, lora_warmup=1, lora_layers=2,
        mote_layers=2, mote_chains=6, mote_batch=2, mote_vocab=8192,
        budget_generate=60, budget_lora=60, budget_mote=90, deadline=240,
    ),
}  # fmt: skip
PARTS = ("generate", "lora", "mote")
VLLM_NOTE = (
    "not measured: vLLM's wheels (with their CUDA libraries) are far over the 64 MiB that "
    "travels to the GPU machine, which has no network"
)
# Rough rates for the printed estimate (H200, bf16): effective matmul rate in training and
# prefill, and the time of one decoding step of ``generate`` per layer (launch-bound).
EST_FLOPS = 300e12
EST_DECODE_STEP_PER_LAYER = 1.2e-3


class PartTimeout(Exception):
    """A part ran past its budget."""


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def n_params(dims: dict) -> int:
    h, L, i, v = (dims[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                    "vocab_size"))  # fmt: skip
    kv = dims["num_key_value_heads"] * h // dims["num_attention_heads"]
    embeddings = (1 if dims.get("tie_word_embeddings") else 2) * v * h
    return embeddings + L * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h


def dims_for(base: dict, smoke: bool, **over: int) -> dict:
    dims = dict(TINY if smoke else base)
    if smoke and "tie_word_embeddings" in base:
        dims["tie_word_embeddings"] = base["tie_word_embeddings"]
    dims.update({k: v for k, v in over.items() if v})
    return dims


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def allocated_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.memory_allocated(device) / 2**30, 2)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def timed(fn: Callable[[], object], repeats: int, device: torch.device, soft_end: float):
    """Seconds of each of up to ``repeats`` runs (at least one; no new run after
    ``soft_end``) and the last result."""
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if time.monotonic() > soft_end:
            break
    return times, result


def random_llama(tokenizer, dims: dict, device: torch.device, dtype: torch.dtype):
    """A random-init Llama built directly on ``device`` in ``dtype`` (no CPU copy, no
    fp32 detour); config as ``selfalign.tiny`` makes it, dims overridden."""
    from transformers import LlamaForCausalLM

    from selfalign.tiny import tiny_config

    torch.manual_seed(0)
    config = tiny_config(tokenizer, **dims)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def tiny_tokenizer():
    from selfalign.tiny import shipped_text_files, train_tokenizer

    return train_tokenizer(4096, shipped_text_files())


# -- (a) generation: our hf backend vs model.generate ----------------------------------
def part_generate(args, device: torch.device, dtype: torch.dtype, soft_end: float) -> dict:
    from prefix_reuse import QUERIES, build_prefix, plain_generate
    from selfalign.backends import GenerationRequest, SamplingParams
    from selfalign.backends.hf import HFBackend

    tokenizer = tiny_tokenizer()
    dims = dims_for(LLAMA_1B, args.cpu_smoke, num_hidden_layers=args.gen_layers)
    model = random_llama(tokenizer, dims, device, dtype).eval()
    with torch.no_grad():  # EOS never wins: every row decodes exactly gen_new_tokens
        model.get_output_embeddings().weight[tokenizer.eos_token_id].zero_()
    backend = HFBackend("random-init", model=model, tokenizer=tokenizer, batch_size=args.gen_batch)
    prefix = build_prefix(backend, args.gen_prefix_tokens)
    queries = [f"{QUERIES[i % len(QUERIES)]} (#{i})" for i in range(args.gen_batch)]
    n = args.gen_new_tokens

    def ours(new_tokens: int, cold: bool):
        if cold:
            backend._prefix_caches.clear()
        params = SamplingParams(max_new_tokens=new_tokens)
        return backend.generate([GenerationRequest(prompt=q, prefix=prefix, params=params)
                                 for q in queries])  # fmt: skip

    # warm-up: kernels, allocator, cuBLAS handles (both paths, few tokens)
    plain_generate(backend, prefix, 2, queries)
    ours(2, cold=True)
    reset_peak(device)
    t_plain, (plain_text, _) = timed(lambda: plain_generate(backend, prefix, n, queries),
                                args.gen_repeats, device, soft_end)  # fmt: skip
    peak_plain = peak_gib(device)
    reset_peak(device)
    t_cold, _ = timed(lambda: ours(n, cold=True), args.gen_repeats, device, soft_end)
    t_warm, results = timed(lambda: ours(n, cold=False), args.gen_repeats, device, soft_end)
    peak_ours = peak_gib(device)
    completion = sum(r.completion_tokens for r in results)
    expected = len(queries) * n
    s_plain, s_cold, s_warm = (statistics.median(t) for t in (t_plain, t_cold, t_warm))
    return {
        "model": "random-init Llama, tiny 4k-token tokenizer"
        + ("" if args.cpu_smoke else " (1B dims)"),
        "dims": dims,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "batch": len(queries),
        "prefix_tokens": len(backend.encode(prefix)),
        "new_tokens_per_row": n,
        "completion_tokens": completion,
        "all_rows_full_length": completion == expected,
        "same_text_as_generate": sum(a == r.text for a, r in zip(plain_text, results, strict=True)),
        "seconds": {
            "generate": t_plain,
            "ours_prefill_included": t_cold,
            "ours_prefix_cached": t_warm,
        },
        "tokens_per_s": {
            "generate": round(expected / s_plain, 1),
            "ours_prefill_included": round(expected / s_cold, 1),
            "ours_prefix_cached": round(expected / s_warm, 1),
        },
        "ratio_vs_generate": {
            "ours_prefill_included": round(s_plain / s_cold, 3),
            "ours_prefix_cached": round(s_plain / s_warm, 3),
        },
        "peak_gib": {"generate": peak_plain, "ours": peak_ours},
        "note": "tokens/s = batch x new tokens / median seconds of a whole call (prefill "
        "included); 'prefix cached' is every later batch of a stage; EOS's output row is "
        "zeroed so all paths decode the same number of tokens",
    }


# -- (b) LoRA SFT step ------------------------------------------------------------------
def part_lora(args, device: torch.device, dtype: torch.dtype, soft_end: float) -> dict:
    from peft import get_peft_model

    from selfalign.train.config import TrainConfig
    from selfalign.train.model import enable_checkpointing, lora_config

    train = TrainConfig()  # our SFT defaults: r=16, alpha 16, dropout 0.05, q/k/v/o
    tokenizer = tiny_tokenizer()
    dims = dims_for(LLAMA_8B, args.cpu_smoke, num_hidden_layers=args.lora_layers)
    model = random_llama(tokenizer, dims, device, dtype)
    model.config.use_cache = False
    weights_gib = allocated_gib(device)
    enable_checkpointing(model)
    model = get_peft_model(model, lora_config(train))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train.learning_rate, weight_decay=0.0)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, dims["vocab_size"], (args.lora_batch, args.lora_seq), generator=g)
    ids = ids.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    losses = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, train.max_grad_norm)
        optimizer.step()
        losses.append(loss.detach())

    reset_peak(device)
    timed(step, args.lora_warmup, device, float("inf"))
    times, _ = timed(step, args.lora_steps, device, soft_end)
    s = statistics.median(times)
    tokens = args.lora_batch * args.lora_seq
    n = n_params(dims)
    return {
        "model": "random-init Llama" + ("" if args.cpu_smoke else " (8B dims)"),
        "dims": dims,
        "parameters": n,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "dtype": str(dtype).removeprefix("torch."),
        "lora": {"r": train.lora_r, "alpha": train.lora_alpha, "targets": train.target_modules},
        "gradient_checkpointing": True,
        "batch": args.lora_batch,
        "seq": args.lora_seq,
        "steps_timed": len(times),
        "seconds": times,
        "seconds_per_step": round(s, 4),
        "tokens_per_s": round(tokens / s, 1),
        # frozen base: forward + recomputed forward + input-gradient backward ~ 6N per token
        "approx_tflop_s": round(6 * n * tokens / s / 1e12, 1),
        "weights_gib": weights_gib,
        "peak_gib": peak_gib(device),
        "loss_first_last": [round(float(losses[0]), 4), round(float(losses[-1]), 4)],
        "note": "plain loop (trl is not on the GPU machine): forward with labels, backward, "
        "clip to max_grad_norm, AdamW on the adapter, bf16 autocast as the Trainer's bf16; "
        "random token ids",
    }


# -- (c) MoTE packed vs expanded ----------------------------------------------------------
def part_mote(args, device: torch.device, dtype: torch.dtype, soft_end: float) -> dict:
    import mote_efficiency

    tokenizer = tiny_tokenizer()
    dims = dims_for(LLAMA_8B, args.cpu_smoke, num_hidden_layers=args.mote_layers,
                    vocab_size=args.mote_vocab or len(tokenizer))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        model = random_llama(tokenizer, dims, device, dtype)
        model.save_pretrained(base, safe_serialization=True)
        tokenizer.save_pretrained(base)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        reset_peak(device)
        out = Path(tmp) / "report.json"
        argv = ["--model", str(base), "--chains", str(args.mote_chains),
                "--batch-size", str(args.mote_batch), "--device", device.type,
                "--dtype", str(dtype).removeprefix("torch."), "--out", str(out)]  # fmt: skip
        mote_efficiency.main(argv)
        report = json.loads(out.read_text(encoding="utf-8"))
    packed, expanded = report["packed"], report["expanded"]
    for r in (packed, expanded):
        r["seconds_per_step"] = round(r["seconds"] / max(1, r["optimizer_steps"]), 4)
    return {
        "model": f"random-init Llama, {dims['num_hidden_layers']} layers"
        + ("" if args.cpu_smoke else " of the 8B's dims"),
        "dims": dims,
        "dtype": str(dtype).removeprefix("torch."),
        "chains": report["chains"],
        "batch": args.mote_batch,
        "packed": packed,
        "expanded": expanded,
        "time_ratio": round(report["time_ratio"], 3),
        "step_time_ratio": round(packed["seconds_per_step"] / expanded["seconds_per_step"], 3),
        "flops_ratio": round(report["flops_ratio"], 3),
        "token_ratio": round(report["token_ratio"], 3),
        "paper": report["paper"],
        "peak_gib": peak_gib(device),
        "note": "benchmarks/mote_efficiency.py: one epoch each over the same chains with "
        "train_mote (FLOPs from a counted run, seconds = train_runtime of a separate run); "
        "time_ratio = packed / expanded total seconds",
    }


# -- driver ---------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    import importlib.metadata as md

    env = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_threads": torch.get_num_threads(),
    }
    for name in ("transformers", "peft", "accelerate", "tokenizers", "pydantic"):
        try:
            module = __import__(name)
            env[name] = f"{md.version(name)} ({Path(module.__file__).parent.parent})"
        except Exception as e:  # a missing package shows here, and fails its part later
            env[name] = f"missing: {e}"
    try:
        env["selfalign_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
            text=True, timeout=10,
        ).stdout.strip() or None  # fmt: skip
    except Exception:
        env["selfalign_commit"] = None
    return env


def estimate(args) -> dict:
    """Rough seconds per part on an H200 (model builds and imports not counted)."""
    n1 = n_params(dims_for(LLAMA_1B, False, num_hidden_layers=args.gen_layers))
    calls = 1 + 2 * args.gen_repeats + args.gen_repeats  # plain, ours cold and cached
    prefill = 2 * n1 * args.gen_batch * args.gen_prefix_tokens * (1 + args.gen_repeats) / EST_FLOPS
    decode = calls * args.gen_new_tokens * args.gen_layers * EST_DECODE_STEP_PER_LAYER
    n8 = n_params(dims_for(LLAMA_8B, False, num_hidden_layers=args.lora_layers))
    steps = args.lora_warmup + args.lora_steps
    lora = steps * 6 * n8 * args.lora_batch * args.lora_seq / EST_FLOPS
    nm = n_params(dims_for(LLAMA_8B, False, num_hidden_layers=args.mote_layers,
                           vocab_size=args.mote_vocab or 4102))  # fmt: skip
    # ~130 tokens per packed chain, expanded ~3.7x that (measured on the CPU); a
    # FLOPs-counted and a timed run of each; nine saves or loads of the model (~2 GB/s).
    mote_tokens = args.mote_chains * 130 * 4.7 * 2
    mote = 6 * nm * mote_tokens / EST_FLOPS + 9 * 2 * nm / 2e9 + 30
    out = {"generate": prefill + decode + 10, "lora": lora + 15, "mote": mote}
    out = {k: round(v) for k, v in out.items() if k in args.parts}
    out["total"] = sum(out.values())
    return out


def write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny dims on the CPU")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ",".join(PARTS))
    ap.add_argument("--out", type=Path, help="default: $OUT/gpu_check.json or runs/")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"],
                    help="default bfloat16 (cpu-smoke float32)")  # fmt: skip
    for key, value in PRESETS["gpu"].items():
        ap.add_argument("--" + key.replace("_", "-"), type=type(value), default=None,
                        help=f"default {value} (cpu-smoke {PRESETS['cpu-smoke'][key]})")  # fmt: skip
    args = ap.parse_args(argv)
    preset = PRESETS["cpu-smoke" if args.cpu_smoke else "gpu"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.parts = [p for p in args.parts.split(",") if p]
    if unknown := set(args.parts) - set(PARTS):
        ap.error(f"unknown parts: {sorted(unknown)}")
    out = args.out or Path(os.environ.get("OUT") or ROOT / "runs") / "gpu_check.json"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    t_start = time.monotonic()
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = getattr(torch, args.dtype or ("float32" if args.cpu_smoke else "bfloat16"))
    report: dict = {
        "check": "selfalign scripts/gpu_check.py (issue #17)",
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
    }
    if not args.cpu_smoke and not torch.cuda.is_available():
        report["error"] = "no CUDA device (use --cpu-smoke for the CPU run)"
        write(out, report)
        log(report["error"])
        return 1
    report["environment"] = environment(device)
    log(f"python {report['environment']['python']}, torch {torch.__version__}, "
        f"device {report['environment']['device']}")  # fmt: skip
    if report["environment"]["python"].rsplit(".", 1)[0] != "3.12" and not args.cpu_smoke:
        log("note: the GPU machine's python was 3.12 when this was written")
    if not args.cpu_smoke:
        report["estimate_seconds"] = estimate(args)
        log(f"rough estimate on an H200 (s): {report['estimate_seconds']}")
    report["vllm"] = VLLM_NOTE
    write(out, report)

    def on_alarm(signum, frame):
        raise PartTimeout("ran past its time budget")

    signal.signal(signal.SIGALRM, on_alarm)
    deadline = t_start + args.deadline
    functions = {"generate": part_generate, "lora": part_lora, "mote": part_mote}
    for name in args.parts:
        budget = min(getattr(args, f"budget_{name}"), deadline - time.monotonic())
        if budget < 10:
            report[name] = {"skipped": "no time left under --deadline"}
            write(out, report)
            continue
        log(f"{name}: start (budget {budget:.0f} s)")
        t0 = time.monotonic()
        reset_peak(device)
        signal.alarm(max(1, int(budget)))
        try:
            # no new timed repeat after 60% of the budget; the alarm is the hard stop
            result = functions[name](args, device, dtype, soft_end=t0 + 0.6 * budget)
        except Exception as e:
            result = {"error": f"{type(e).__name__}: {e}"[:2000],
                      "traceback": traceback.format_exc()[-4000:]}  # fmt: skip
        finally:
            signal.alarm(0)
        result["part_seconds"] = round(time.monotonic() - t0, 1)
        report[name] = result
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report["wall_seconds"] = round(time.monotonic() - t_start, 1)
        write(out, report)
        log(f"{name}: {'error: ' + result['error'] if 'error' in result else 'done'} "
            f"in {result['part_seconds']} s")  # fmt: skip
    failed = [p for p in args.parts if "error" in report.get(p, {})]
    log(f"wrote {out} ({report['wall_seconds']} s; failed parts: {failed or 'none'})")
    print(json.dumps({p: summary(report.get(p, {})) for p in args.parts}, indent=2))
    return 1 if failed else 0


def summary(part: dict) -> dict:
    keys = ("error", "skipped", "tokens_per_s", "ratio_vs_generate", "seconds_per_step",
            "peak_gib", "time_ratio", "step_time_ratio", "flops_ratio", "part_seconds")  # fmt: skip
    return {k: part[k] for k in keys if k in part}


if __name__ == "__main__":
    sys.exit(main())
