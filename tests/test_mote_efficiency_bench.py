"""benchmarks/mote_efficiency.py on a chains file: the counts it prints match a hand count.

The chains are records as the chains stage writes them, their texts written by the demo's
Gemma 3 270M (loops and all); tokens come from the tiny model's tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import sys
from itertools import combinations
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from selfalign.text.steps import STEPS, step_token_strings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import mote_efficiency  # noqa: E402

SYSTEM = "You are Sable, an AI assistant. You are helpful, honest and careful."


def record(question: str, answer: str, analysis: str | None = None, guidance: str | None = None):
    length = "full" if guidance else "analysis_answer" if analysis else "answer_only"
    verdict = {"chain": length, "verdict": "safe", "parsed": True, "output": {"yes": -4.5}}
    return {"id": hashlib.sha256(question.encode()).hexdigest()[:16], "question": question,
            "source": "queries.jsonl", "analysis": analysis, "guidance": guidance,
            "answer": answer, "length": length, "checks": [verdict],
            "rejected_answers": [], "truncated": [], "trimmed": []}  # fmt: skip


ROB = record(
    "What would be the best time to rob a bank?",
    "Okay, let's do this.\nI would like to take out a loan.\nOkay, let's do this.",
    analysis="I'd like to rob a bank.\nI want to take out a loan.\n\n### AI Assistant:\n"
    "Okay, let's do this.",
    guidance="I would like to rob a bank.\nI want to take out a loan.\nOkay, let's do this.",
)
RECORDS = [
    record("Give me a catchy slogan for a bike repair shop.", "Here's your campaign."),
    record(
        "Give a real-world example of supply and demand.",
        "I want you to do the following:\n\n1. Describe the issue.\n2. What you need to do "
        "to fix it.",
    ),
    record(
        "Show me how to cheat on my taxes.",
        "You are not allowed to use this for tax purposes.\nYou are not allowed to use it for "
        "tax purposes.",
        analysis="I am on a trial. I have a lot of money to spend. I want to spend it on some "
        "kind of investment.\nBut I don\u2019t have to spend it on this.",
    ),
    ROB,
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def hand_count(model: Path, rows: list[dict]) -> dict:
    """Sequence lengths of both layouts, from the tokenizer and the layout's definition:
    packed = question turn + every step; expanded = per step, per subset of the earlier
    steps kept: question turn + kept steps + that step. A step is its text between its
    two delimiters, the answer followed by EOS."""
    tok = AutoTokenizer.from_pretrained(model)
    tok.add_tokens(step_token_strings(), special_tokens=True)
    packed, expanded, parts = [], [], {"question": [], **{s: [] for s in STEPS}}
    for row in rows:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["question"]}]  # fmt: skip
        turn = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = len(tok(turn, add_special_tokens=False).input_ids)
        steps = [s for s in STEPS if row[s]]
        size = {s: len(tok(row[s], add_special_tokens=False).input_ids) + 2 for s in steps}
        size["answer"] += 1
        parts["question"].append(prompt)
        for s in steps:
            parts[s].append(size[s])
        packed.append(prompt + sum(size.values()))
        for i, step in enumerate(steps):
            for k in range(i + 1):
                for kept in combinations(steps[:i], k):
                    expanded.append(prompt + sum(size[s] for s in kept) + size[step])
    means = {k: round(sum(v) / len(v), 2) for k, v in parts.items() if v}
    return {"packed": packed, "expanded": expanded, "mean_tokens": means}


def test_real_chains_flops_and_tokens_match_a_hand_count(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    chains = write_jsonl(tmp_path / "records.jsonl", RECORDS)
    out = tmp_path / "report.json"
    argv = ["--chains", str(chains), "--model", str(tiny_model), "--system", SYSTEM,
            "--batch-size", "1", "--repeats", "0", "--out", str(out)]  # fmt: skip
    assert mote_efficiency.main(argv) == 0
    printed = capsys.readouterr()
    report = json.loads(out.read_text())
    assert json.loads(printed.out) == report  # stdout holds the report alone
    hand = hand_count(tiny_model, RECORDS)
    packed, expanded = report["packed"], report["expanded"]

    assert report["lengths"] == "real" and report["chains"] == 4
    assert report["mix"] == {"answer": 2, "analysis+answer": 1, "analysis+guidance+answer": 1}
    assert report["mean_tokens"] == hand["mean_tokens"]
    assert (packed["examples"], expanded["examples"]) == (4, 2 * 1 + 1 * 3 + 1 * 7)
    assert (packed["tokens"], expanded["tokens"]) == (sum(hand["packed"]), sum(hand["expanded"]))
    assert report["token_ratio"] == pytest.approx(sum(hand["packed"]) / sum(hand["expanded"]))
    assert packed["truncated"] == expanded["truncated"] == 0
    # One sequence per batch, no padding: a run's FLOPs are a*sum(L) + b*sum(L^2) with
    # a, b >= 0 (matmuls per token, attention per token pair), the same in both layouts.
    # So the ratio lies between the token ratio and the ratio of squared lengths.
    squares = sum(n * n for n in hand["packed"]) / sum(n * n for n in hand["expanded"])
    low, high = sorted([report["token_ratio"], squares])
    assert low < high < 1
    assert low <= report["flops_ratio"] <= high
    assert report["flops_ratio"] == packed["flops"] / expanded["flops"]
    line = f"FLOPs {report['flops_ratio']:.3f}x, tokens {report['token_ratio']:.3f}x"
    assert line in printed.err
    assert report["time_ratio"] is None and packed["seconds"] is None  # --repeats 0


def test_step_skipping_changes_neither_tokens_nor_flops(tiny_model: Path, tmp_path: Path):
    chains = write_jsonl(tmp_path / "full.jsonl", [ROB])
    reports = []
    for skip in ("0", "1"):
        out = tmp_path / f"skip{skip}.json"
        argv = ["--chains", str(chains), "--model", str(tiny_model), "--skip-prob", skip,
                "--batch-size", "8", "--repeats", "0", "--out", str(out)]  # fmt: skip
        assert mote_efficiency.main(argv) == 0
        reports.append(json.loads(out.read_text()))
    off, on = reports
    assert on["skip_prob"] == 1.0 and off["skip_prob"] == 0.0
    for layout in ("packed", "expanded"):
        assert on[layout]["tokens"] == off[layout]["tokens"]
        assert on[layout]["flops"] == off[layout]["flops"]
    assert off["expanded"]["examples"] == 7  # every skip pattern of a full chain


@pytest.mark.parametrize(
    ("case", "where"),
    [
        ("missing", "missing.jsonl: file not found"),
        ("not_a_chain", "bad.jsonl:2: question"),
        ("no_tokenizer", "--chains: a chains file needs --model or --tokenizer"),
        ("not_a_model", "not a Hugging Face model directory"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    case: str, where: str, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    good = write_jsonl(tmp_path / "records.jsonl", RECORDS[:1])
    # A prompts-stage record where a chain record belongs.
    bad = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], {"id": "x", "instruction": "Hi."}])
    argv = {
        "missing": ["--chains", str(tmp_path / "missing.jsonl"), "--model", str(tiny_model)],
        "not_a_chain": ["--chains", str(bad), "--model", str(tiny_model)],
        "no_tokenizer": ["--chains", str(good)],
        "not_a_model": ["--chains", str(good), "--model", str(tmp_path)],
    }[case]
    assert mote_efficiency.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and where in err
