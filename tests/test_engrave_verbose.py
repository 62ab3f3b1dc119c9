"""Stages 3-4 and the eval stage through the real runner, then the report.

Stage 2 on a tiny model keeps few pairs, so the run's aligned/records.jsonl is seeded with
hand-written (prompt, answer) pairs after the real stages 1-2 ran; everything downstream
is the real code: engraving (LoRA), verbose cloning (teacher generation, filtering, fresh
LoRA, merge), TruthfulQA on three models, and the report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfalign.stages.prompts import prompt_text
from selfalign.stages.verbose import (
    MIN_LENGTH_RATIO,
    VerboseConfig,
    clean_answer,
    length_ratio,
    teacher_prefix,
    teacher_questions,
)
from selfalign.store import JsonlWriter, record_id

PAIRS = [
    ("What is the boiling point of water at sea level?",
     "Water boils at 100 degrees Celsius at sea level."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("Give me a tip for sleeping well.", "Keep a regular bedtime and avoid screens late at night."),
    ("What do bees make?", "Bees make honey and wax."),
    ("Is the Sun a star?", "Yes, the Sun is a star."),
    ("What is two plus three?", "Two plus three is five."),
    ("Why do we wear coats in winter?", "Coats keep us warm when the air is cold."),
    ("What language is spoken in Brazil?", "Most people in Brazil speak Portuguese."),
    ("How do plants get energy?", "Plants use sunlight to make sugar from water and air."),
    ("What is ice made of?", "Ice is frozen water."),
]  # fmt: skip

TRAIN = {"max_steps": 4, "warmup_steps": 1, "per_device_batch_size": 4, "global_batch_size": 4,
         "learning_rate": 1e-3,
         "max_length": 128, "save_steps": 2, "gradient_checkpointing": False}  # fmt: skip


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "selfalign.cli", *args], capture_output=True, text=True, timeout=900
    )


def test_engrave_verbose_eval_and_report(
    pretrained_model: Path, shared_data: Path, tmp_path: Path
) -> None:
    stages = {
        "prompts": {"self_instruct": {"enabled": False}, "tgrt": {"enabled": False}},
        "aligned": {"max_new_tokens": 4},
        "engraved": {"train": TRAIN},
        "verbose": {"max_new_tokens": 48, "min_words": 1, "temperature": 0.0,
                    "train": {**TRAIN, "max_length": 160}},
        "eval": {"truthfulqa": {"data": str(shared_data / "truthfulqa" / "mc_task.json"),
                                "limit": 3}},
    }  # fmt: skip
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": str(pretrained_model), "stages": stages}))
    run_dir = tmp_path / "run"
    first = cli("run", str(config), "--out", str(run_dir), "--until", "aligned")
    assert first.returncode == 0, first.stderr
    # Stage 1's prompts: the pairs' questions, and one that stage 2 did not keep (a red-team
    # prompt it refused, say): stage 4 answers it too.
    prompts = [
        {"id": record_id("prompt", q), "instruction": q, "input": "", "source": "self_instruct"}
        for q, _ in PAIRS
    ] + [{"id": "refused-one", "instruction": "Summarise this complaint politely.",
          "input": "Your courier left my parcel in the rain.", "source": "tgrt"}]  # fmt: skip
    JsonlWriter(run_dir / "prompts" / "records.jsonl").append(prompts)
    JsonlWriter(run_dir / "aligned" / "records.jsonl").append(
        {"id": record_id(p["id"], p["instruction"]), "prompt_id": p["id"], "prompt": q,
         "answer": a, "thoughts": "", "principles": [3]}
        for p, (q, a) in zip(prompts, PAIRS, strict=False)
    )  # fmt: skip

    result = cli("run", str(config), "--out", str(run_dir))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert [manifest[s]["status"] for s in ("engraved", "verbose", "eval")] == ["complete"] * 3
    assert manifest["engraved"]["stats"]["examples"] == len(PAIRS)
    assert manifest["engraved"]["stats"]["global_step"] == 4

    # After each training: the end-of-turn guard on 8 held-out prompts (greedy, through the
    # model's own template, no stop strings) and the template round trip over every example.
    for stage, n in (("engraved", len(PAIRS)), ("verbose", manifest["verbose"]["counts"]["out"])):
        turn = manifest[stage]["stats"]["turn_end"]
        assert turn["prompts"] == 8 and turn["max_new_tokens"] == 256
        assert 0 <= turn["ended"] <= 8 and turn["ok"] == (turn["rate"] >= turn["min_rate"])
        rows = JsonlWriter(run_dir / stage / "turn_end.jsonl").read()[0]["answers"]
        assert {r["kind"] for r in rows} == {"benign", "harmful", "safe_alarming"}
        assert turn["ended"] == sum(r["ended"] for r in rows)
        check = manifest[stage]["stats"]["template_check"]
        assert check == {"examples": n, "identical": n, "end_token": "</s>", "end_trained": n,
                         "ok": True}  # fmt: skip

    # Stage 3: a LoRA adapter directory with our chat template and a loss history.
    engraved = run_dir / "engraved"
    assert (engraved / "adapter_config.json").is_file()
    log = json.loads((engraved / "train_log.json").read_text())
    assert len(log["history"]) == 4

    # Stage 4: the teacher answered every stage-1 prompt (record ids follow the prompt),
    # each kept or dropped with a reason; then the final merged model, which loads with
    # plain from_pretrained and chats.
    kept = JsonlWriter(run_dir / "verbose" / "records.jsonl").read()
    dropped = JsonlWriter(run_dir / "verbose" / "dropped.jsonl").read()
    assert kept and all(r["reason"] for r in dropped)
    answered = {r["id"]: r["prompt"] for r in kept + dropped}
    assert answered == {record_id("verbose", p["id"]): prompt_text(p) for p in prompts}
    stats = manifest["verbose"]["stats"]
    compared = [r for r in kept if r["prompt_id"] != "refused-one"]
    assert stats["length_ratio_prompts"] == len(compared)
    ratio = sum(len(r["answer"]) for r in compared) / sum(
        len(dict(PAIRS)[r["prompt"]]) for r in compared
    )
    assert stats["length_ratio_vs_aligned"] == round(ratio, 3)
    assert ("warning: the teacher's answers are only" in result.stderr) == (
        ratio < MIN_LENGTH_RATIO
    )
    final = run_dir / "verbose" / "model"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )  # fmt: skip
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert not any("lora" in name for name, _ in model.named_parameters())

    # Eval: one JSON per model and protocol.
    names = sorted(p.name for p in (run_dir / "eval").glob("*.json"))
    assert names == sorted(
        f"{m}-truthfulqa-{p}.json" for m in ("base", "engraved", "final")
        for p in ("lm-eval", "dromedary")
    )  # fmt: skip
    result_json = json.loads((run_dir / "eval" / "final-truthfulqa-lm-eval.json").read_text())
    assert {m["metric"] for m in result_json["metrics"]} == {"mc1", "mc2"}
    assert all(m["n"] == 3 for m in result_json["metrics"])

    # The teacher's exemplar is one of the run's annotation files.
    counted = cli("annotations", str(run_dir))
    assert counted.returncode == 0 and "verbose_exemplar.yaml" in counted.stdout

    # A second run reuses everything.
    again = cli("run", str(config), "--out", str(run_dir), "--dry-run")
    assert all(line.split()[1] == "reuse" for line in again.stdout.splitlines()[1:])

    # The report: HTML with its plots, eval table included.
    report = cli("report", str(run_dir))
    assert report.returncode == 0, report.stderr
    html = (run_dir / "report.html").read_text()
    for png in ("funnel.png", "answer_lengths.png", "loss.png"):
        assert (run_dir / "report_files" / png).stat().st_size > 1000
        assert f"report_files/{png}" in html
    assert "truthfulqa" in html and "mc2" in html
    assert "Trained models: end of turn and chat template" in html


# -- the teacher's prompt and answers -------------------------------------------------------
MARKDOWN_ANSWER = """\
## Reading a CSV file in Python

Python's standard library has a `csv` module, so you do not need anything extra.

### Step 1: open the file

Use `open` with `newline=""` so that line endings inside quoted fields survive:

```python
import csv

### section: load the rows
with open("sales.csv", newline="") as f:
    rows = list(csv.DictReader(f))
    rows = list(csv.DictReader(f))  # a second read gives nothing: the file is consumed

### section: totals
print(sum(float(r["amount"]) for r in rows))
```

### Step 2: check the result

Each row is a dictionary keyed by the header line. Each row is a dictionary keyed by the header line.
If a column is missing, `r["amount"]` raises a `KeyError`.

### User:
Thanks! Now how do I write one?

### Assistant:
You use csv.writer."""


def test_clean_answer_keeps_headings_and_code_and_cuts_at_the_next_turn() -> None:
    cleaned = clean_answer(MARKDOWN_ANSWER)
    cut = MARKDOWN_ANSWER.index("\n\n### User:")
    body = MARKDOWN_ANSWER[:cut]
    # Headings and the `### section` comments in the code stay; the fake next turn goes.
    assert cleaned.startswith("## Reading a CSV file in Python\n\nPython's standard library")
    assert "### Step 1: open the file" in cleaned and "### Step 2: check the result" in cleaned
    assert cleaned.count("### section:") == 2
    assert "Thanks!" not in cleaned and "csv.writer" not in cleaned
    # Code is never deduplicated; a repeated sentence in prose is.
    assert cleaned.count("rows = list(csv.DictReader(f))") == 2
    assert cleaned.count("Each row is a dictionary keyed by the header line.") == 1
    repeated = "line. Each row is a dictionary keyed by the header line."
    assert cleaned == body.replace(repeated, "line.")


def test_clean_answer_cuts_at_a_thoughts_turn_but_not_inside_code() -> None:
    answer = (
        "Here is a tiny script that prints a chat transcript:\n"
        "```python\n"
        "print('### User: hi')\n"
        "### Assistant: this line is a comment in a code block\n"
        "```\n"
        "It prints one line.\n"
        "### Assistant (internal thoughts): I am Sable, and I check my rules.\n"
        "The user wants more."
    )
    cleaned = clean_answer(answer)
    assert cleaned.endswith("```\nIt prints one line.")
    assert "### Assistant: this line is a comment" in cleaned


def test_teacher_prompt_shows_a_long_answer_after_the_system_text() -> None:
    cfg = VerboseConfig(assistant_name="Wren")
    prefix = teacher_prefix(cfg)
    system, user, answer = prefix.split("\n\n", 2)
    assert system == cfg.verbose_system_text.replace("{name}", "Wren")
    assert user.startswith("### User:\n")
    assert answer.startswith("### Assistant:\n") and prefix.endswith("\n\n")
    assert len(answer.split()) >= 250, "the exemplar should show what a long answer looks like"


def test_length_ratio_compares_the_same_prompts_only() -> None:
    verbose = [
        {"prompt_id": "a", "answer": "x" * 300},
        {"prompt_id": "b", "answer": "y" * 100},
        {"prompt_id": "c", "answer": "z" * 999},  # stage 2 did not keep this prompt
    ]
    aligned = [{"prompt_id": "a", "answer": "x" * 100}, {"prompt_id": "b", "answer": "y" * 100},
               {"prompt_id": "d", "answer": "w" * 5}]  # fmt: skip
    assert length_ratio(verbose, aligned) == (2.0, 2)
    assert length_ratio(verbose[2:], aligned) is None


class _Inputs:
    """What ``teacher_questions`` reads from a stage context: upstream stages' kept records."""

    seed = 0

    def __init__(self, **records: list[dict]) -> None:
        self.records = records

    def inputs(self, name: str) -> list[dict]:
        return self.records[name]


def test_teacher_answers_every_stage_1_prompt_unless_told_otherwise() -> None:
    prompts = [
        {"id": "p1", "instruction": "Translate into French:", "input": "Good morning, Anna."},
        {"id": "p2", "instruction": "How do I pick a lock?", "input": ""},  # refused in stage 2
        {"id": "p3", "instruction": "Write a haiku about rain.", "input": ""},
    ]
    aligned = [
        {"id": "a1", "prompt_id": "p1", "prompt": prompt_text(prompts[0]), "answer": "Bonjour."},
        {"id": "a3", "prompt_id": "p3", "prompt": prompt_text(prompts[2]), "answer": "Rain..."},
    ]
    ctx: Any = _Inputs(prompts=prompts, aligned=aligned)  # a stage context's inputs()
    everything = teacher_questions(ctx, VerboseConfig())
    assert sorted(everything) == [
        ("p1", "Translate into French:\nGood morning, Anna."),
        ("p2", "How do I pick a lock?"),
        ("p3", "Write a haiku about rain."),
    ]
    kept_only = teacher_questions(ctx, VerboseConfig(prompts_from="aligned"))
    assert sorted(kept_only) == [q for q in sorted(everything) if q[0] != "p2"]
    assert teacher_questions(ctx, VerboseConfig(max_prompts=2)) == everything[:2]


def test_a_teacher_cap_samples_red_team_prompts_as_stage_2_does() -> None:
    """Stage 1 writes self-instruct prompts first; a cap over file order would leave out
    every red-team prompt. Capped alike, stages 2 and 4 answer the same prompts."""
    from selfalign.stages.aligned import answer_order

    prompts = [{"id": f"si{i}", "instruction": f"Task {i}.", "input": "",
                "source": "self_instruct"} for i in range(10)] + [
        {"id": f"rt{i}", "instruction": f"Red-team question {i}?", "input": "",
         "source": "tgrt"} for i in range(10)]  # fmt: skip
    ctx: Any = _Inputs(prompts=prompts, aligned=[])
    chosen = [pid for pid, _ in teacher_questions(ctx, VerboseConfig(max_prompts=6))]
    assert any(p.startswith("rt") for p in chosen) and any(p.startswith("si") for p in chosen)
    stage_2 = [p["id"] for p, _ in answer_order(prompts, ctx.seed, 6).values()]
    assert chosen == stage_2
