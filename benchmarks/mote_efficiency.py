"""Packed MoTE training vs the expanded-datasets (multi-LoRA) baseline: FLOPs and time.

Both train one epoch on the same chains with the same model, batch size and expert
architecture; only the data layout differs (``MoteTrainConfig.method`` "mote" vs
"expanded"). The chain mix follows the paper's AlignCoT statistics (answer-only /
analysis->answer / full: 1710 / 608 / 3682 of 6000); the text is synthetic, since only
token counts matter here.

FLOPs: counted by ``torch.utils.flop_counter.FlopCounterMode`` over the whole training
run (forward + backward matmuls and attention; eager attention so attention is counted
on CPU too). Time: ``train_runtime`` of separate, uncounted runs (best of --repeats).
Paper: packed training needs 0.35x the FLOPs and 0.67x the time. Exits 1 if the FLOPs
ratio is above 0.5.

    python benchmarks/mote_efficiency.py [--chains 24] [--model DIR] [--out result.json]
        [--device cpu|cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from selfalign.mote import MoteConfig, MoteTrainConfig, train_mote
from selfalign.tiny import make_tiny_model

PAPER_MIX = {
    ("answer",): 1710,
    ("analysis", "answer"): 608,
    ("analysis", "guidance", "answer"): 3682,
}
# Words per field (min, max); chosen so a full chain is ~4x its question.
LENGTHS = {"question": (10, 25), "analysis": (20, 40), "guidance": (15, 30), "answer": (30, 70)}
_VOCAB = (
    "the a user asks about how to make safe help risk harm intent request answer explain "
    "consider context clear kind honest refuse offer instead reason because people could "
    "should would information legal careful useful step check tone short detail example"
)
WORDS = _VOCAB.split()


def synthetic_chains(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    total = sum(PAPER_MIX.values())
    kinds = [k for k, c in PAPER_MIX.items() for _ in range(round(n * c / total))]
    rng.shuffle(kinds)

    def text(field: str) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*LENGTHS[field])))

    return [
        {
            "question": text("question"),
            **{s: (text(s) if s in kind else None) for s in ("analysis", "guidance", "answer")},
        }
        for kind in kinds
    ]


def run(chains, model_dir, out_dir, method, args, *, count_flops: bool) -> dict:
    config = MoteTrainConfig(
        method=method,
        mote=MoteConfig(rank=16),
        epochs=1,
        batch_size=args.batch_size,
        learning_rate=1e-4,
        warmup=0,
        logging_steps=10**6,
        progress=False,
        device=args.device,
        dtype=args.dtype,
        attn_implementation="eager" if count_flops else "sdpa",
        max_length=4096,
    )
    if not count_flops:
        return train_mote(chains, model_dir, out_dir, config).metrics
    with FlopCounterMode(display=False) as counter:
        metrics = train_mote(chains, model_dir, out_dir, config).metrics
    return {**metrics, "flops": counter.get_total_flops()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=24)
    parser.add_argument(
        "--model", type=Path, help="HF model dir (default: a tiny Llama built here)"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per method (best)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (timing is steadier)")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    chains = synthetic_chains(args.chains, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = args.model or make_tiny_model(
            work / "base",
            seed=args.seed,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
        )
        results = {}
        for method in ("mote", "expanded"):
            counted = run(
                chains, model_dir, work / f"{method}-flops", method, args, count_flops=True
            )
            times = [
                run(chains, model_dir, work / f"{method}-{i}", method, args, count_flops=False)[
                    "train_runtime"
                ]
                for i in range(args.repeats)
            ]
            results[method] = {
                "examples": counted["examples"],
                "tokens": counted["tokens"],
                "loss_tokens": counted["loss_tokens"],
                "optimizer_steps": counted["steps"],
                "flops": counted["flops"],
                "seconds": min(times),
            }
    packed, expanded = results["mote"], results["expanded"]
    report = {
        "chains": len(chains),
        "mix": {
            "+".join(k): sum(
                1
                for c in chains
                if [s for s in ("analysis", "guidance", "answer") if c[s]] == list(k)
            )
            for k in PAPER_MIX
        },
        "packed": packed,
        "expanded": expanded,
        "flops_ratio": packed["flops"] / expanded["flops"],
        "time_ratio": packed["seconds"] / expanded["seconds"],
        "token_ratio": packed["tokens"] / expanded["tokens"],
        "paper": {"flops_ratio": 0.35, "time_ratio": 0.67},
    }
    print(f"{'':10}{'examples':>10}{'tokens':>10}{'TFLOPs':>10}{'seconds':>10}", file=sys.stderr)
    for name, r in (("packed", packed), ("expanded", expanded)):
        print(
            f"{name:10}{r['examples']:>10}{r['tokens']:>10}{r['flops'] / 1e12:>10.3f}{r['seconds']:>10.2f}",
            file=sys.stderr,
        )
    print(
        f"packed/expanded: FLOPs {report['flops_ratio']:.3f}x, time {report['time_ratio']:.3f}x "
        f"(paper: 0.35x, 0.67x)",
        file=sys.stderr,
    )
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0 if report["flops_ratio"] <= 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
