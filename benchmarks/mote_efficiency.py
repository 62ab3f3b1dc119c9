"""Packed MoTE training vs the expanded-datasets (multi-LoRA) baseline: FLOPs and time.

Both train one epoch on the same chains with the same model, batch size and expert
architecture; only the data layout differs (``MoteTrainConfig.method`` "mote" vs
"expanded"). The chains are either real, ``--chains FILE`` (JSONL chain records as the
chains stage writes them, e.g. ``RUN/chains/records.jsonl``; the tokenizer comes from
``--model`` or ``--tokenizer``), or, by default, invented: the paper's AlignCoT mix
(answer-only / analysis->answer / full: 1710 / 608 / 3682 of 6000) with random words of
invented lengths, since only token counts matter.

FLOPs: counted by ``torch.utils.flop_counter.FlopCounterMode`` over the whole training
run (forward + backward matmuls and attention; eager attention so attention is counted
on CPU too; padding inside a batch is counted, as training pays for it). Tokens: the
summed lengths of the training sequences, without padding. Time: ``train_runtime`` of
separate, uncounted runs (best of --repeats; 0 skips them). Step skipping
(``--skip-prob``) only masks attention inside a packed chain: it changes neither the
tokens nor the counted FLOPs, while the expanded baseline writes every skip pattern out
as a sequence of its own. ``--model DIR`` trains that model; ``--tokenizer DIR`` a
random-init 4-layer Llama with that tokenizer's vocabulary; neither: the tiny model.

Paper: packed training needs 0.35x the FLOPs and 0.67x the time. On invented chains the
script exits 1 if the FLOPs ratio is above 0.5; on a chains file the ratio is whatever the
file's mix gives, reported with exit 0. Bad input (a missing or unreadable file, a line
that is not a chain record, no tokenizer for a file): one line on stderr, exit 2.

    python benchmarks/mote_efficiency.py [--chains N | --chains FILE] [--model DIR |
        --tokenizer DIR] [--system TEXT] [--skip-prob P] [--batch-size 4] [--repeats 1]
        [--out result.json] [--device cpu|cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from selfalign.errors import InputError
from selfalign.mote import Chain, MoteConfig, MoteTrainConfig, parse_chains, train_mote
from selfalign.mote.data import prompt_ids, step_segment
from selfalign.mote.steps import StepTokens
from selfalign.store import read_jsonl_numbered
from selfalign.text.steps import STEPS, step_token_strings
from selfalign.tiny import make_tiny_model, tiny_config

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
# The model built when no --model is given (tiny dims, wide enough for a steady count).
DIMS = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4}
SMALL = "Llama (4 layers, hidden 256)"


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


def chains_arg(value: str) -> int | Path:
    """``--chains``: digits are a count of invented chains, anything else a file."""
    return int(value) if value.isdigit() else Path(value)


def read_chains(path: Path) -> list[Chain]:
    """The chain records of a JSONL file; a bad line raises InputError naming it."""
    chains = []
    for line, record in read_jsonl_numbered(path):
        try:
            chains.extend(parse_chains([record]))
        except InputError as e:
            raise InputError(e.detail, file=path, line=line, field=e.field) from None
    return chains


def load_tokenizer(path: Path, flag: str):
    """The tokenizer of a model directory, with the step delimiters MoTE adds."""
    from transformers import AutoTokenizer

    if not path.is_dir():
        raise InputError("not a directory", file=path, field=flag)
    if flag == "--model" and not (path / "config.json").is_file():
        raise InputError("not a Hugging Face model directory (no config.json)", file=path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise InputError(f"no tokenizer loads from it ({e})", file=path, field=flag) from None
    tokenizer.add_tokens(step_token_strings(), special_tokens=True)  # as add_step_tokens
    return tokenizer


def random_llama(tokenizer_dir: Path, out: Path, seed: int) -> Path:
    """A random-init Llama of ``DIMS`` with the vocabulary of ``tokenizer_dir``'s
    tokenizer, saved with that tokenizer to ``out``."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tokenizer, **DIMS))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def chain_stats(chains: list[Chain], tokenizer, system: str | None) -> dict:
    """The chain mix and mean tokens per part, counted as the encoder counts them: the
    question turn (chat format and system prompt included) and each step with its two
    delimiters (the answer with its EOS too)."""
    tokens = StepTokens.from_tokenizer(tokenizer)
    lengths: dict[str, list[int]] = {"question": [], **{s: [] for s in STEPS}}
    for chain in chains:
        lengths["question"].append(len(prompt_ids(tokenizer, chain.question, system)))
        for step in chain.steps:
            lengths[step].append(len(step_segment(tokenizer, tokens, step, getattr(chain, step))))
    mix = Counter("+".join(chain.steps) for chain in chains)
    return {
        "mix": dict(sorted(mix.items(), key=lambda kv: len(kv[0]))),
        "mean_tokens": {k: round(statistics.fmean(v), 2) for k, v in lengths.items() if v},
    }


def run(chains, model_dir, out_dir, method, args, *, count_flops: bool) -> dict:
    config = MoteTrainConfig(
        method=method,
        mote=MoteConfig(rank=16),
        step_skip_prob=args.skip_prob,
        system=args.system,
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
    # The Trainer prints its closing log line; stdout is kept for the JSON report.
    with contextlib.redirect_stdout(sys.stderr):
        if not count_flops:
            return train_mote(chains, model_dir, out_dir, config).metrics
        with FlopCounterMode(display=False) as counter:
            metrics = train_mote(chains, model_dir, out_dir, config).metrics
    return {**metrics, "flops": counter.get_total_flops()}


def measure(chains, model_dir: Path, work: Path, args) -> dict:
    """Counted and timed runs of both layouts on the same chains and model."""
    results = {}
    for method in ("mote", "expanded"):
        counted = run(chains, model_dir, work / f"{method}-flops", method, args, count_flops=True)
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
            "truncated": counted["truncated"],
            "optimizer_steps": counted["steps"],
            "flops": counted["flops"],
            "seconds": min(times) if times else None,
        }
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--chains",
        type=chains_arg,
        default=24,
        help="a chains JSONL file (real chains; needs --model or --tokenizer), or a number "
        "of invented chains (default 24; a file named by digits: ./NAME)",
    )
    parser.add_argument(
        "--model", type=Path, help="HF model dir (default: a tiny Llama built here)"
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="tokenize with this model dir's tokenizer; train a random-init 4-layer Llama "
        "of its vocabulary",
    )
    parser.add_argument("--system", help="system prompt of the chat format (as the run's)")
    parser.add_argument(
        "--skip-prob",
        type=float,
        default=MoteTrainConfig().step_skip_prob,
        help="step skipping in packed training (masks only: same tokens and FLOPs)",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs per method (best; 0: FLOPs only)"
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (timing is steadier)")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def print_summary(report: dict) -> None:
    packed, expanded = report["packed"], report["expanded"]
    print(f"chains: {report['source']}; model: {report['model']}", file=sys.stderr)
    mix = ", ".join(f"{k} {v}" for k, v in report["mix"].items())
    means = ", ".join(f"{k} {v}" for k, v in report["mean_tokens"].items())
    print(f"mix: {mix}; mean tokens: {means}", file=sys.stderr)
    print(f"{'':10}{'examples':>10}{'tokens':>10}{'TFLOPs':>10}{'seconds':>10}", file=sys.stderr)
    for name, r in (("packed", packed), ("expanded", expanded)):
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.2f}"
        print(
            f"{name:10}{r['examples']:>10}{r['tokens']:>10}{r['flops'] / 1e12:>10.3f}{seconds:>10}",
            file=sys.stderr,
        )
    time = "-" if report["time_ratio"] is None else f"{report['time_ratio']:.3f}x"
    print(
        f"packed/expanded: FLOPs {report['flops_ratio']:.3f}x, tokens "
        f"{report['token_ratio']:.3f}x, time {time} (paper: FLOPs 0.35x, time 0.67x)",
        file=sys.stderr,
    )


def benchmark(args: argparse.Namespace) -> int:
    real = isinstance(args.chains, Path)
    if args.model is not None and args.tokenizer is not None:
        raise InputError("use --model or --tokenizer, not both", field="--tokenizer")
    if real:
        if args.model is None and args.tokenizer is None:
            raise InputError("a chains file needs --model or --tokenizer", field="--chains")
        chains = read_chains(args.chains)
    else:
        chains = [Chain.model_validate(c) for c in synthetic_chains(args.chains, args.seed)]
    if not chains:
        raise InputError("no chains to train on", field="--chains")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.model is not None:
            tokenizer = load_tokenizer(args.model, "--model")
            model_dir, model = args.model, str(args.model)
        elif args.tokenizer is not None:
            tokenizer = load_tokenizer(args.tokenizer, "--tokenizer")
            model_dir = random_llama(args.tokenizer, work / "base", args.seed)
            model = f"random-init {SMALL}, vocabulary of {args.tokenizer}"
        else:
            model_dir = make_tiny_model(work / "base", seed=args.seed, **DIMS)
            tokenizer = load_tokenizer(model_dir, "--model")
            model = f"tiny {SMALL}"
        stats = chain_stats(chains, tokenizer, args.system)
        results = measure(chains, model_dir, work, args)
    packed, expanded = results["mote"], results["expanded"]
    report = {
        "chains": len(chains),
        "lengths": "real" if real else "invented",
        "source": f"{args.chains} (real lengths)"
        if real
        else f"{len(chains)} invented (paper mix, invented lengths)",
        "model": model,
        "system": args.system,
        "skip_prob": args.skip_prob,
        "batch_size": args.batch_size,
        **stats,
        "packed": packed,
        "expanded": expanded,
        "flops_ratio": packed["flops"] / expanded["flops"],
        "time_ratio": ratio(packed["seconds"], expanded["seconds"]),
        "token_ratio": packed["tokens"] / expanded["tokens"],
        "paper": {"flops_ratio": 0.35, "time_ratio": 0.67},
    }
    print_summary(report)
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0 if real or report["flops_ratio"] <= 0.5 else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    try:
        return benchmark(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
