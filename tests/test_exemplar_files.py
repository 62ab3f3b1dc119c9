"""Several exemplars files for stage 2 (``stages.aligned.exemplars`` as a list), and the
sixth exemplar the Dromedary-2 recipe adds (configs/dromedary2/)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from selfalign.annotations import DEFAULT_EXEMPLARS, DEFAULT_PRINCIPLES
from selfalign.annotations.count import count_annotations
from selfalign.annotations.principles import load_exemplars
from selfalign.backends import BackendConfig
from selfalign.backends.hf import HFBackend
from selfalign.cli import main
from selfalign.errors import InputError
from selfalign.stages.aligned import AlignedConfig, annotation_files, build
from selfalign.stages.prompts import prompt_text
from selfalign.text.thoughts import THOUGHTS_TAG

SIXTH = (
    Path(__file__).resolve().parents[1]
    / "configs"
    / "dromedary2"
    / "general_specific_exemplar.yaml"
)
SIXTH_QUESTION = "How can I make my laptop battery last longer?"


def test_the_sixth_exemplar_is_general_specific_general() -> None:
    shipped = load_exemplars(DEFAULT_EXEMPLARS, num_principles=16)
    sixth = load_exemplars(SIXTH, num_principles=16)
    assert sixth.self_description == shipped.self_description
    (ex,) = sixth.exemplars
    assert ex.covers not in {e.covers for e in shipped.exemplars}
    assert ex.user not in {e.user for e in shipped.exemplars}
    assert ex.analysis.count(". ") == 0 and ex.analysis.endswith(".")  # one sentence
    lines = ex.answer.strip().splitlines()
    numbered = [i for i, line in enumerate(lines) if re.match(r"\d+\. ", line)]
    # a general opening, numbered specifics in a row, one general closing line
    assert numbered[0] == 1 and numbered == list(range(1, len(lines) - 1)) and len(numbered) >= 3
    assert len(re.findall(r"[.!?](?:\s|$)", lines[0])) <= 2
    assert len(re.findall(r"[.!?](?:\s|$)", lines[-1])) == 1
    assert 120 <= len(ex.answer.split()) <= 200
    assert "{" not in ex.answer and "Sorry" not in ex.answer


def test_two_files_give_six_exemplars_in_order() -> None:
    one, two = build(AlignedConfig())[0], build(AlignedConfig(exemplars=[None, SIXTH]))[0]
    assert len(one.exemplar_turns()) == 5
    turns = two.exemplar_turns()
    assert turns[:5] == one.exemplar_turns() and len(turns) == 6
    prefix = two.prefix()
    assert prefix.count("### User:") == 6 and prefix.count(THOUGHTS_TAG) == 6
    user, thoughts, answer = turns[5]
    assert user == SIXTH_QUESTION
    assert thoughts.startswith("I am Kestrel, an AI assistant, and before replying")
    assert thoughts.endswith("I should follow rules 3 (useful), 6 (thorough), 2 (accurate).")
    assert prefix.endswith(f"{THOUGHTS_TAG}\n{thoughts}\n\n### Assistant:\n{answer}\n\n")
    assert annotation_files(AlignedConfig(exemplars=[None, SIXTH])) == [
        DEFAULT_PRINCIPLES, DEFAULT_EXEMPLARS, SIXTH,
    ]  # fmt: skip


def test_stage_2_on_the_tiny_model_uses_all_six(run_aligned, tiny_model: Path, tmp_path) -> None:
    """The prefix the backend prefilled is the six-exemplar one: its token count shows up
    in the usage counters, and the run config's annotation count lists both files."""
    questions = ["How do I keep basil alive on a windowsill?", "What is a haiku?"]
    block = BackendConfig(model=str(tiny_model))
    rows = run_aligned(block, tiny_model, tmp_path, questions, exemplars=[None, str(SIXTH)],
                       max_new_tokens=8)  # fmt: skip
    entry = json.loads((tmp_path / "manifest.json").read_text())["stages"]["aligned"]
    assert entry["status"] == "complete" and entry["counts"]["in"] == 2
    prompt = build(AlignedConfig(exemplars=[None, SIXTH]))[0]
    five = build(AlignedConfig())[0]
    tok = HFBackend(tiny_model)
    shared = len(tok.head_ids + tok.encode(prompt.prefix()))
    assert shared > len(tok.head_ids + tok.encode(five.prefix()))
    own = [len(tok.encode(prompt.query_prompt(prompt_text(r)))) for r in rows]
    assert entry["usage"]["prefill_tokens"] == (shared - 1) + sum(n + 1 for n in own)
    counted = {c.path.name: c.items for c in count_annotations(tmp_path / "config.yaml")}
    assert counted["exemplars.yaml"] == 5 and counted[SIXTH.name] == 1


def test_a_later_file_must_agree_with_the_first(tmp_path: Path) -> None:
    other = tmp_path / "other.yaml"
    other.write_text(SIXTH.read_text().replace("work out which", "decide which"))
    with pytest.raises(InputError) as err:
        build(AlignedConfig(exemplars=[None, other]))
    assert str(err.value).startswith(f"{other}: self_description: differs from the first")
    bad_rule = tmp_path / "bad_rule.yaml"
    bad_rule.write_text(SIXTH.read_text().replace("rules: [3, 6, 2]", "rules: [3, 17]"))
    with pytest.raises(InputError, match=r"bad_rule\.yaml:\d+: exemplars#1\.rules: rule 17"):
        annotation_files(AlignedConfig(exemplars=[SIXTH, bad_rule]))


def test_a_bad_second_file_exits_2_at_plan_time(tiny_model: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "mine.yaml"
    other.write_text(SIXTH.read_text().replace("{name}, an AI", "{name}, a helpful AI"))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model: {tiny_model}\nstages:\n"
        "  prompts: {self_instruct: {enabled: false}, tgrt: {enabled: false}}\n"
        f"  aligned: {{exemplars: [null, {other.name}]}}\n"
    )
    assert main(["run", str(cfg), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {other}: self_description: differs") and "\n" not in err


def test_an_empty_list_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1 item"):
        AlignedConfig(exemplars=[])
