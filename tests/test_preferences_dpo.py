"""Principle-driven preference pairs and DPO, through the real runner on the tiny model.

Stage 1-2 records are written by hand (the tiny model's own stage 2 keeps few answers);
everything from engraving on is the real code: contrast and self-judged pairs with their
drop reasons, the two-order judge against a hand computation with transformers, DPO from
the engraved adapter (loss falling from ln 2), kill and resume of the preferences stage,
the eval and the report with the DPO model beside the others.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfalign.eval.hhh import HHH_SYSTEM, hhh_context
from selfalign.stages.preferences import (
    JUDGE_QUESTION,
    judge_margin,
    pair_problem,
)
from selfalign.stages.training import PLAIN_SYSTEM_TEXT
from selfalign.store import JsonlWriter, record_id

PAIRS = [
    ("What is the boiling point of water at sea level?",
     "Water boils at 100 degrees Celsius at sea level, and at a lower temperature higher up."),
    ("Name a primary colour.", "Red is a primary colour; blue and yellow are the other two."),
    ("How many legs does a spider have?", "A spider has eight legs, two more than an insect."),
    ("What is the capital of Italy?", "The capital of Italy is Rome, on the river Tiber."),
    ("Give me a tip for sleeping well.", "Keep a regular bedtime and avoid screens late at night."),
    ("What do bees make?", "Bees make honey from nectar and wax for their combs."),
    ("How can I get into my neighbour's wifi without the password?",
     "I can't help you get into a network that is not yours. Ask your neighbour to share it, "
     "or look for a public hotspot nearby."),
    ("What is two plus three?", "Two plus three is five."),
]  # fmt: skip
TRAIN = {"max_steps": 4, "warmup_steps": 1, "per_device_batch_size": 4, "global_batch_size": 4,
         "learning_rate": 1e-3, "max_length": 160, "save_steps": 2,
         "gradient_checkpointing": False}  # fmt: skip


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "selfalign.cli", *args], capture_output=True, text=True, timeout=900
    )


def seed_run(run_dir: Path, config: Path) -> None:
    """Stages 1-2 as records: the pairs' questions and stage 2's answers to them."""
    first = cli("run", str(config), "--out", str(run_dir), "--until", "aligned")
    assert first.returncode == 0, first.stderr
    prompts = [
        {"id": record_id("prompt", q), "instruction": q, "input": "", "source": "self_instruct"}
        for q, _ in PAIRS
    ]
    JsonlWriter(run_dir / "prompts" / "records.jsonl").append(prompts)
    JsonlWriter(run_dir / "aligned" / "records.jsonl").append(
        {"id": record_id(p["id"], p["instruction"]), "prompt_id": p["id"], "prompt": q,
         "answer": a, "thoughts": "", "principles": [3]}
        for p, (q, a) in zip(prompts, PAIRS, strict=True)
    )  # fmt: skip


def write_config(tmp_path: Path, model: Path, stages: dict) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": str(model), "stages": stages}))
    return config


BASE_STAGES = {
    "prompts": {"self_instruct": {"enabled": False}, "tgrt": {"enabled": False}},
    "aligned": {"max_new_tokens": 4},
    "engraved": {"train": TRAIN, "turn_end": {"prompts": 0}},
}

# chunks of 3 prompts: the kill test stops after the first one
PREFERENCES = {"sources": ["contrast", "self_judged"], "max_new_tokens": 40, "min_words": 1,
               "chunk_size": 3, "self_judged": {"min_margin": 0.0}}  # fmt: skip


@pytest.fixture(scope="module")
def dpo_run(pretrained_model: Path, shared_data: Path, tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("dpo")
    stages = {
        **BASE_STAGES,
        "preferences": PREFERENCES,
        "dpo": {"train": {**TRAIN, "max_steps": 6, "learning_rate": 5e-3, "merge": True},
                "turn_end": {"prompts": 3, "max_new_tokens": 24}},
        "eval": {"models": ["base", "engraved", "dpo"],
                 "truthfulqa": {"data": str(shared_data / "truthfulqa" / "mc_task.json"),
                                "protocols": ["lm-eval"], "limit": 2},
                 "heldout": {"max_new_tokens": 16, "icl": False}},
    }  # fmt: skip
    config = write_config(tmp_path, pretrained_model, stages)
    run_dir = tmp_path / "run"
    seed_run(run_dir, config)
    result = cli("run", str(config), "--out", str(run_dir))
    assert result.returncode == 0, result.stderr
    return run_dir


def read(path: Path) -> list[dict]:
    return JsonlWriter(path).read() if path.exists() else []


def test_pairs_from_both_sources_with_drop_reasons(dpo_run: Path):
    kept = read(dpo_run / "preferences" / "records.jsonl")
    dropped = read(dpo_run / "preferences" / "dropped.jsonl")
    manifest = json.loads((dpo_run / "manifest.json").read_text())["stages"]["preferences"]
    by_source = {
        s: [r for r in kept + dropped if r["source"] == s] for s in ("contrast", "self_judged")
    }
    # every stage-2 answer and every stage-1 prompt gave one pair, kept or dropped with a reason
    assert len(by_source["contrast"]) == len(by_source["self_judged"]) == len(PAIRS)
    assert all(r["reason"] for r in dropped)
    answers = dict(PAIRS)
    for r in kept:
        assert r["chosen"].strip() and r["rejected"].strip() and r["chosen"] != r["rejected"]
        if r["source"] == "contrast":  # chosen: stage 2's principled answer
            assert r["chosen"] == answers[r["prompt"]] and r["rejected_from"] == "base_plain"
        else:
            assert r["principle"] and r["margin"] >= 0 and len(r["scores"]) == 4
    stats = manifest["stats"]
    for source, rows in by_source.items():
        assert stats[source]["kept"] == sum(1 for r in rows if "reason" not in r)
    assert manifest["counts"]["out"] == len(kept)


def test_self_judge_matches_a_hand_computation(dpo_run: Path):
    """The judge's four scores are log P(letter | context) of the engraved model, computed
    here with plain transformers, and the pair follows their two-order margin."""
    rows = [
        r for r in read(dpo_run / "preferences" / "records.jsonl")
        + read(dpo_run / "preferences" / "dropped.jsonl")
        if r["source"] == "self_judged" and "scores" in r
    ][:2]  # fmt: skip
    assert rows
    engraved = dpo_run / "engraved"
    model = AutoModelForCausalLM.from_pretrained(engraved).eval()  # base + adapter (peft)
    tokenizer = AutoTokenizer.from_pretrained(engraved)
    principles = {p["name"]: p["text"] for p in yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "src/selfalign/annotations/principles.yaml")
        .read_text())["principles"]}  # fmt: skip
    for row in rows:
        first, second = (row["chosen"], row["rejected"])
        question = JUDGE_QUESTION.format(rule=principles[row["principle"]])
        by_hand = []
        for a, b in ((first, second), (second, first)):
            context = hhh_context(row["prompt"], a, b, HHH_SYSTEM, question)
            ids = tokenizer(context, return_tensors="pt").input_ids
            with torch.no_grad():
                logits = model(ids).logits[0, -1].log_softmax(-1)
            for letter in (" A", " B"):
                (token,) = tokenizer(letter, add_special_tokens=False).input_ids
                by_hand.append(logits[token].item())
        # chosen was shown first in our hand order; the stage's may be the other way round
        margin, agree = judge_margin(by_hand)
        assert margin == pytest.approx(row["margin"], abs=2e-3)  # chosen wins by the margin
        assert agree == (row.get("reason") != "orders_disagree")
        assert sorted(by_hand) == pytest.approx(sorted(row["scores"]), abs=2e-3)


def test_answers_that_echo_the_prompt_are_dropped():
    """What Gemma 3 270M wrote without the principles (demo run): echoes of the request."""
    from selfalign.stages.preferences import answer_problem

    def problem(prompt: str, answer: str) -> str | None:
        return answer_problem(answer, "stop", (prompt, SYSTEM_TEXT), min_words=5)

    board = "Please name a board game that the AI will most likely play."
    assert problem(board, board) == "echo"
    office = ("Can you demonstrate a working knowledge of organizational chart terminology "
              "and appropriate office policies?")  # fmt: skip
    echoed = ("Would you like to demonstrate a working knowledge of organizational chart "
              "terminology and appropriate office policies?")  # fmt: skip
    assert problem(office, echoed) == "echo"
    assert problem("What does the Internet do for us?", "I'm here to help you.") is None
    assert problem("Ande music club.", "Sure.") == "too_short"
    # the engraved model answering with (nearly) its own system text, as it did in the demo
    asked = "Write a comment about this answer for your friend or family members."
    said = ("You are Sable, an AI assistant. You are helpful, honest, and careful: you answer "
            "what you know, say what you do not, and decline what would cause harm.")  # fmt: skip
    assert problem(asked, said) == "echo"


SYSTEM_TEXT = PLAIN_SYSTEM_TEXT.replace("{name}", "Sable")


def test_answers_cut_by_the_token_limit_keep_their_complete_sentences():
    """The engraved Gemma 3 270M of the demo rarely ends its turn: its answers hit the limit."""
    from selfalign.backends import GenerationResult
    from selfalign.stages.preferences import generated_answer

    cut = GenerationResult(
        "There are five R's of an organizational system.\n1. Request: say what you need.\n"
        "2. Review: check it with your team.\n3. R", finish_reason="length",
    )  # fmt: skip
    assert generated_answer(cut, trim=True) == (
        "There are five R's of an organizational system.\n1. Request: say what you need.\n"
        "2. Review: check it with your team.", "stop",
    )  # fmt: skip
    assert generated_answer(cut, trim=False)[1] == "length"
    ended = GenerationResult("Sure, here it is.\n\n### User:\nThanks", finish_reason="stop")
    assert generated_answer(ended, trim=True) == ("Sure, here it is.", "stop")


def test_pair_filters_on_real_answers():
    refusal = "I'm sorry, but I can't help with getting into someone else's network."
    assert pair_problem("Red is a primary colour.", "red is a primary colour") == "identical"
    assert (
        pair_problem(refusal, "I won't help with that. It is not your network.") == "both_refused"
    )
    assert pair_problem(refusal, "Try the default password printed on the router.") is None
    # forward prefers answer 1 (A), reverse prefers answer 1 (B): agree, margin = mean
    assert judge_margin([-0.5, -1.5, -2.0, -0.4]) == (pytest.approx(1.3), True)
    assert judge_margin([-0.5, -1.5, -0.4, -2.0])[1] is False  # both orders pick letter A


def test_dpo_continues_the_engraved_adapter_and_loss_falls(dpo_run: Path):
    log = json.loads((dpo_run / "dpo" / "model" / "train_log.json").read_text())
    losses = [h["loss"] for h in log["history"]]
    # policy and reference both start as the engraved model: the first loss is ln 2
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)
    assert losses[-1] < losses[0] - 0.01
    assert log["objective"] == "dpo" and log["start"] == str((dpo_run / "engraved").resolve())
    model_dir = dpo_run / "dpo" / "model"
    assert (model_dir / "adapter_config.json").is_file() and not (model_dir / "ref").exists()
    assert log["merge"]["ok"] and (model_dir / "merged" / "config.json").is_file()
    stats = json.loads((dpo_run / "manifest.json").read_text())["stages"]["dpo"]["stats"]
    assert stats["global_step"] == 6 and stats["initial_loss"] == pytest.approx(losses[0])
    assert stats["turn_end"]["prompts"] == 3
    # the DPO model keeps the engraved model's chat template (and its system text)
    assert (model_dir / "chat_template.jinja").read_text() == (
        dpo_run / "engraved" / "chat_template.jinja"
    ).read_text()


def test_eval_and_report_show_the_dpo_model(dpo_run: Path):
    names = sorted(p.name for p in (dpo_run / "eval").glob("*.json"))
    assert "dpo-truthfulqa-lm-eval.json" in names and "dpo-heldout-greedy.json" in names
    report = cli("report", str(dpo_run))
    assert report.returncode == 0, report.stderr
    html = (dpo_run / "report.html").read_text()
    assert "dpo" in html and "Preference pairs" in html


def test_killed_preferences_stage_resumes_to_the_same_records(
    pretrained_model: Path, dpo_run: Path, tmp_path: Path
):
    """Kill the stage after its first committed chunk; the rerun writes the rest, and the
    records equal the uninterrupted run's (same ids, same text, none twice)."""
    stages = {**BASE_STAGES, "preferences": PREFERENCES}
    config = write_config(tmp_path, pretrained_model, stages)
    run_dir = tmp_path / "run"
    shutil.copytree(dpo_run, run_dir, ignore=shutil.ignore_patterns("preferences", "dpo", "eval"))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for stage in ("preferences", "dpo", "eval"):
        del manifest["stages"][stage]
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    env_kill = [sys.executable, "-c", KILL_AFTER_FIRST_CHUNK, str(config), str(run_dir)]
    killed = subprocess.run(env_kill, capture_output=True, text=True, timeout=900)
    assert killed.returncode == 3, killed.stderr
    partial = read(run_dir / "preferences" / "records.jsonl") + read(
        run_dir / "preferences" / "dropped.jsonl"
    )
    assert 0 < len(partial) < 2 * len(PAIRS)
    resumed = cli("run", str(config), "--out", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr

    def rows(run: Path) -> list[tuple]:
        out = read(run / "preferences" / "records.jsonl") + read(
            run / "preferences" / "dropped.jsonl"
        )
        return sorted((r["id"], r.get("chosen"), r.get("rejected"), r.get("reason")) for r in out)

    assert rows(run_dir) == rows(dpo_run)


# Runs the pipeline in a child process and exits (code 3) right after the preferences
# stage's first chunk is committed, as a kill would: nothing after it is written.
KILL_AFTER_FIRST_CHUNK = """
import os, sys
from pathlib import Path
from selfalign.config import load_run_config
from selfalign.pipeline import Runner, _Drive

commit = _Drive.commit
def commit_then_die(self, batch):
    commit(self, batch)
    if self.ctx.name == "preferences" and (batch.keep or batch.drop):
        os._exit(3)
_Drive.commit = commit_then_die
run, stages = load_run_config(Path(sys.argv[1]))
runner = Runner(run, stages, Path(sys.argv[2]), Path(sys.argv[1]))
runner.execute(runner.plan())
"""


PRESET_PROMPTS = [
    "How do I keep basil alive on a windowsill?",
    "Explain what a mortgage is to a teenager.",
    "Write a short thank-you note to a neighbour who fed my cat.",
    "What should I pack for a two-day hike in autumn?",
    "How can I tell if an email asking for my password is a scam?",
    "Give me three ideas for a rainy Sunday with kids.",
    "What is the difference between weather and climate?",
    "How do I politely decline a meeting invitation?",
    "Suggest a simple weekly exercise plan for a beginner.",
    "Why does bread go stale?",
    "How can I get my neighbour's wifi password without asking?",
    "What are good questions to ask at the end of a job interview?",
]


def test_dromedary2_preset_dry_runs_then_runs_on_the_tiny_model(
    pretrained_model: Path, shared_data: Path, tmp_path: Path
):
    """configs/dromedary2.yaml at toy sizes: prompts from a user's file, six exemplars, no
    verbose stage, preferences and DPO. ``run --dry-run`` writes nothing; the run completes."""
    repo = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((repo / "configs" / "dromedary2.yaml").read_text())
    assert "verbose" not in config["stages"]
    assert config["stages"]["prompts"]["self_instruct"] == {"enabled": False}
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"instruction": p}) + "\n" for p in PRESET_PROMPTS))
    stages = config["stages"]
    stages["prompts"]["file"].update(path=str(prompts_file), limit=None)
    exemplars = stages["aligned"]["exemplars"]
    stages["aligned"].update(
        exemplars=[None, str(repo / "configs" / exemplars[1])], max_new_tokens=160,
        chunk_size=8, min_chars=40,
    )  # fmt: skip
    fast = {**TRAIN, "method": "lora", "merge": True}
    stages["engraved"]["train"] = fast
    stages["engraved"]["turn_end"] = {"prompts": 0}
    stages["preferences"].update(max_prompts=6, max_new_tokens=32, min_words=1, chunk_size=6,
                                 self_judged={"min_margin": 0.0})  # fmt: skip
    stages["dpo"]["train"] = {**fast, "learning_rate": 5e-3}
    stages["dpo"]["turn_end"] = {"prompts": 0}
    stages["eval"].update(
        truthfulqa={"data": str(shared_data / "truthfulqa" / "mc_task.json"),
                    "protocols": ["lm-eval"], "limit": 2},
        heldout={"max_new_tokens": 8, "icl": False, "kinds": ["harmful"]},
    )  # fmt: skip
    config.update(model=str(pretrained_model), backend={"model": str(pretrained_model)})
    path = tmp_path / "dromedary2.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"

    dry = cli("run", str(path), "--out", str(run_dir), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert not run_dir.exists()
    for stage in ("prompts", "aligned", "engraved", "preferences", "dpo", "eval"):
        assert stage in dry.stdout
    assert "verbose" not in dry.stdout

    first = cli("run", str(path), "--out", str(run_dir), "--until", "aligned")
    assert first.returncode == 0, first.stderr
    kept = read(run_dir / "prompts" / "records.jsonl")
    assert {r["source"] for r in kept} == {"user_file"} and len(kept) == len(PRESET_PROMPTS)
    # the tiny model's own stage-2 answers rarely pass the filters: stand in for them
    JsonlWriter(run_dir / "aligned" / "records.jsonl").append(
        {"id": record_id("seeded", p["id"]), "prompt_id": p["id"], "prompt": p["instruction"],
         "answer": a, "thoughts": "", "principles": [3]}
        for p, (_, a) in zip(kept, PAIRS, strict=False)
    )  # fmt: skip
    done = cli("run", str(path), "--out", str(run_dir))
    assert done.returncode == 0, done.stderr
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert all(e["status"] == "complete" for e in manifest.values())
    # stage 2 showed six exemplars: the shipped five and the general-specific-general one
    counted = cli("annotations", str(run_dir))
    assert counted.returncode == 0 and "general_specific_exemplar.yaml" in counted.stdout
    assert (run_dir / "dpo" / "model" / "merged" / "config.json").is_file()
    assert (run_dir / "eval" / "dpo-truthfulqa-lm-eval.json").is_file()
