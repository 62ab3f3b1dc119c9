"""TruthfulQA MC1/MC2 (lm-eval protocol): our scorer vs lm-evaluation-harness itself.

The same model directory and batch size on both sides. lm-eval's own ``HFLM`` runs its
``evaluate`` over the ``truthfulqa_mc1`` and ``truthfulqa_mc2`` tasks (ours under
``selfalign/eval/lm_eval_tasks``: lm-eval's prompt, choices and metrics, reading the
local file) and scores every (context, choice) as one full sequence, logits at every
position. Ours (``score_lm_eval`` on ``HFBackend``) runs each question's context once
and then only the choices on top of its KV cache, each distinct pair once. Asserts that
both give the same per-choice log-likelihoods and the same MC1 and MC2.

lm-eval on a 262k-vocabulary model computes a vocabulary-sized logit row for every
token: all 817 questions take hours on a small CPU. ``--baseline-limit N`` runs it (and
ours beside it, for the ratio) on the first N questions; ours alone also runs on
``--limit`` (default: all). Each timing is the median of its repeats (``--repeats``
for ours on the compared questions, ``--baseline-repeats`` for lm-eval,
``--full-repeats`` for ours on all of them).

    python benchmarks/eval_speed.py [--model DIR] [--limit 817] [--baseline-limit 50]
        [--repeats 3] [--baseline-repeats 1] [--full-repeats 1] [--batch-size 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from selfalign.backends.hf import HFBackend
from selfalign.eval.truthfulqa import MCQuestion, load_truthfulqa, score_lm_eval

DEFAULT_DATA = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "truthfulqa" / "mc_task.json"
)
TASKS = ("truthfulqa_mc1", "truthfulqa_mc2")


def ours(backend: HFBackend, questions: list[MCQuestion]) -> tuple[float, dict]:
    """(seconds, {mc1, mc2, lls: per question (mc1 lls, mc2 lls)})."""
    t0 = time.perf_counter()
    scores = score_lm_eval(backend, questions)
    seconds = time.perf_counter() - t0
    n = len(scores)
    return seconds, {
        "mc1": sum(s.mc1_correct for s in scores) / n,
        "mc2": sum(s.mc2 for s in scores) / n,
        "lls": [(s.mc1_lls, s.mc2_lls) for s in scores],
    }


def harness_model(model: Path, args: argparse.Namespace):
    """lm-eval's own ``HFLM`` on the model directory, loaded once for every repeat."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model), device=args.device, batch_size=args.batch_size,
                dtype=args.dtype)  # fmt: skip


def harness(lm, data: Path, limit: int) -> tuple[float, dict]:
    """lm-eval's ``evaluate`` with ``lm`` on the first ``limit`` questions: (seconds of
    ``evaluate``, the same fields as ``ours``). The tasks load before timing."""
    from lm_eval.evaluator import evaluate

    from selfalign.eval.lm_eval_run import load_tasks, task_manager

    tasks = load_tasks(task_manager(TASKS, [], data), TASKS)
    t0 = time.perf_counter()
    out = evaluate(lm=lm, task_dict=tasks, limit=limit, log_samples=True, bootstrap_iters=0)
    seconds = time.perf_counter() - t0
    samples = {
        k: sorted(out["samples"][f"truthfulqa_{k}"], key=lambda s: s["doc_id"])
        for k in ("mc1", "mc2")
    }
    lls = [
        ([r[0] for r in a["filtered_resps"]], [r[0] for r in b["filtered_resps"]])
        for a, b in zip(samples["mc1"], samples["mc2"], strict=True)
    ]
    results = out["results"]
    return seconds, {
        "mc1": results["truthfulqa_mc1"]["acc,none"],
        "mc2": results["truthfulqa_mc2"]["acc,none"],
        "lls": lls,
    }


def max_ll_diff(a: dict, b: dict) -> float:
    return max(
        abs(x - y)
        for (a1, a2), (b1, b2) in zip(a["lls"], b["lls"], strict=True)
        for x, y in zip(a1 + a2, b1 + b2, strict=True)
    )


def median_run(fn, repeats: int) -> tuple[float, list[float], dict]:
    times, result = [], {}
    for _ in range(repeats):
        seconds, result = fn()
        times.append(seconds)
        print(f"  {seconds:.1f} s", file=sys.stderr)
    return statistics.median(times), [round(t, 2) for t in times], result


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, help="HF model dir (default: a fresh tiny model)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--limit", type=int, help="questions ours runs alone (default: all)")
    ap.add_argument("--baseline-limit", type=int, default=50, help="questions lm-eval runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline-repeats", type=int, default=1)
    ap.add_argument("--full-repeats", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from selfalign.tiny import make_tiny_model

            model = make_tiny_model(Path(tmp) / "tiny", seed=0)
        backend = HFBackend(model, batch_size=args.batch_size, dtype=args.dtype, device=args.device)
        every = load_truthfulqa(args.data)
        n_all = len(every) if args.limit is None else min(args.limit, len(every))
        n_sub = min(args.baseline_limit, n_all)
        score_lm_eval(backend, every[-2:])  # warm-up (allocator, kernels), not timed
        print(f"lm-eval, {n_sub} questions:", file=sys.stderr)
        lm = harness_model(model, args)
        theirs_s, theirs_times, theirs = median_run(
            lambda: harness(lm, args.data, n_sub), args.baseline_repeats
        )
        print(f"ours, {n_sub} questions:", file=sys.stderr)
        sub_s, sub_times, sub = median_run(lambda: ours(backend, every[:n_sub]), args.repeats)
        full = None
        if n_all > n_sub:
            print(f"ours, {n_all} questions:", file=sys.stderr)
            full = median_run(lambda: ours(backend, every[:n_all]), args.full_repeats)

    diff = max_ll_diff(sub, theirs)
    assert diff < 1e-3, f"log-likelihoods differ from lm-eval's by up to {diff}"
    assert abs(sub["mc1"] - theirs["mc1"]) < 1e-9, "MC1 differs from lm-eval's"
    assert abs(sub["mc2"] - theirs["mc2"]) < 1e-6, "MC2 differs from lm-eval's"
    report = {
        "model": str(args.model or "tiny (make_tiny_model seed 0)"),
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "batch_size": args.batch_size,
        "compared_questions": n_sub,
        "lm_eval_s": round(theirs_s, 2),
        "lm_eval_all_s": theirs_times,
        "ours_s": round(sub_s, 2),
        "ours_all_s": sub_times,
        "speedup_vs_lm_eval": round(theirs_s / sub_s, 2),
        "max_abs_ll_diff": diff,
        "mc1": {"ours": sub["mc1"], "lm_eval": theirs["mc1"]},
        "mc2": {"ours": sub["mc2"], "lm_eval": theirs["mc2"]},
    }
    if full is not None:
        full_s, full_times, full_result = full
        report["ours_full"] = {
            "questions": n_all, "seconds": round(full_s, 2), "all_s": full_times,
            "mc1": full_result["mc1"], "mc2": full_result["mc2"],
            # lm-eval's time per question on the compared ones, times all of them
            "lm_eval_extrapolated_s": round(theirs_s / n_sub * n_all, 1),
        }  # fmt: skip
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
