"""Stage 1 (``prompts``): seed files, TGRT pieces, and the stage run end to end with the tiny
model (random weights: it writes gibberish, so the run shows the drop path and the
bookkeeping; the keep path is covered with hand-written continuations in
test_self_instruct_parse.py), including resume after a kill at a round boundary."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import yaml

from selfalign.annotations.loaders import (
    RedTeamSeed,
    load_redteam_types,
    load_seed_tasks,
)
from selfalign.backends import GenerationResult
from selfalign.chunking import pending_chunks
from selfalign.cli import main
from selfalign.config import RunConfig
from selfalign.errors import InputError
from selfalign.registry import load_stage
from selfalign.stages.api import StageContext
from selfalign.stages.prompts import PromptsConfig, prompt_text
from selfalign.stages.self_instruct import resume_point
from selfalign.stages.tgrt import (
    balance,
    parse_topics,
    question_examples,
    question_id,
    question_verdict,
    question_work,
)
from selfalign.text.parsing import ItemFilter
from selfalign.text.rouge import near_duplicates

# -- seed files ---------------------------------------------------------------------------


def test_shipped_seed_tasks_are_diverse_and_pass_our_own_filters():
    tasks = load_seed_tasks()
    assert 150 <= len(tasks) <= 180
    assert len({t.id for t in tasks}) == len(tasks)
    assert sum(1 for t in tasks if t.input) >= 30
    assert all(ItemFilter().verdict(t.instruction) is None for t in tasks)
    assert near_duplicates([t.instruction for t in tasks]) == [None] * len(tasks)


def test_shipped_redteam_types():
    seeds = load_redteam_types()
    assert len(seeds) == 20 and len({s.type for s in seeds}) == 20
    assert all(len(s.topic.split()) <= 3 for s in seeds)


def test_public_self_instruct_seed_file_loads(shared_data):
    tasks = load_seed_tasks(shared_data / "self_instruct_seed" / "seed_tasks.jsonl")
    assert len(tasks) == 175 and tasks[0].id == "seed_task_0"
    assert any(t.input for t in tasks) and all(t.instruction for t in tasks)


BAD_SEEDS = [
    ('{"instruction": "Name a color."}\n{"input": "x"}\n', 2, "missing field 'instruction'"),
    ("", None, "file is empty"),
    ('{"instruction": "Name a color."}\n\n{"instruction": "Say hi.",}\n', 3, "invalid JSON"),
    (b'{"instruction": "Name a color."}\n{"instruction": "caf\xe9"}\n', 2, "not valid UTF-8"),
    ('{"instruction": ["a"]}\n', 1, "'instruction' must be a string"),
    ('{"instruction": "  "}\n', 1, "'instruction' is empty"),
    ('["instruction"]\n', 1, "expected a JSON object"),
    ('{"instruction": "Say hi.", "instances": []}\n', 1, "'instances' must be"),
]


@pytest.mark.parametrize("content, line, message", BAD_SEEDS)
def test_bad_seed_files_name_file_and_line(tmp_path, content, line, message):
    path = tmp_path / "seeds.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError) as err:
        load_seed_tasks(path)
    assert err.value.file == path and err.value.line == line and message in str(err.value)


def test_bad_redteam_file(tmp_path):
    path = tmp_path / "types.jsonl"
    path.write_text('{"type": "a", "topic": "b", "instruction": "c"}\n{"type": "a"}\n')
    with pytest.raises(InputError, match="types.jsonl:2: missing field 'topic'"):
        load_redteam_types(path)


def test_run_with_bad_seed_file_exits_2(tmp_path, tiny_model, capsys):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "Name three birds."}\n{"instruction": 5}\n')
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_model),
                "stages": {"prompts": {"self_instruct": {"seed_tasks": "seeds.jsonl"}}},
            }
        )
    )
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {seeds}:2: 'instruction' must be a string"


# -- small pieces -------------------------------------------------------------------------


def test_prompt_text():
    assert prompt_text({"instruction": " Sum these. ", "input": "1, 2"}) == "Sum these.\n1, 2"
    assert prompt_text({"instruction": "Say hi.", "input": ""}) == "Say hi."


def test_parse_topics():
    got = parse_topics(
        " stock prices, sports scores!, ¿qué?, a very long topic name here, , weather tod",
        truncated=True,
        max_words=3,
    )
    assert got == [
        ("stock prices", None),
        ("sports scores!", None),
        ("¿qué?", "bad_topic"),
        ("a very long topic name here", "topic_too_long"),
        ("weather tod", "truncated"),
    ]
    assert parse_topics(" traffic, news\n- ignored", truncated=True, max_words=3) == [
        ("traffic", None),
        ("news", None),
    ]


def test_balance_cuts_every_type_to_the_smallest():
    # a0 and b0 are the seeds' own topics (round -1): examples, never counted or asked
    topics = {
        "a": [{"id": f"a{i}", "topic": f"ta{i}", "round": i - 1} for i in range(4)],
        "b": [{"id": f"b{i}", "topic": f"tb{i}", "round": i - 1} for i in range(3)],
    }
    kept, cut = balance(topics, target=10)
    assert {k: [e["id"] for e in v] for k, v in kept.items()} == {
        "a": ["a1", "a2"],
        "b": ["b1", "b2"],
    }
    assert [(r["id"], why) for r, why in cut.drop] == [("a3", "unbalanced")]
    # One brainstormed topic per type (a small run): each type still gets its question;
    # counting the seed topic would have kept only the seeds and asked nothing.
    kept, cut = balance(topics, target=1)
    assert {k: [e["id"] for e in v] for k, v in kept.items()} == {"a": ["a1"], "b": ["b1"]}
    assert {why for _, why in cut.drop} == {"over_target"} and len(cut.drop) == 3
    # A type that brainstormed nothing within the round cap does not zero the others.
    topics["c"] = [{"id": "c0", "topic": "tc0", "round": -1}]
    kept, cut = balance(topics, target=10)
    assert [len(kept[k]) for k in "abc"] == [2, 2, 0] and len(cut.drop) == 1


def test_resume_point_ignores_records_of_unmarked_rounds():
    rounds = [{"phase": "self_instruct", "round": 0}, {"phase": "tgrt_topics", "round": 0},
              {"phase": "self_instruct", "round": 1}]  # fmt: skip
    records = [{"id": f"r{i}", "source": "self_instruct", "round": i // 2} for i in range(6)]
    records.append({"id": "t", "source": "tgrt"})
    assert resume_point(rounds, records) == (2, records[:4])
    assert resume_point([], records) == (0, [])


def test_question_examples_and_verdicts():
    seeds = [RedTeamSeed(f"id{i}", f"type{i % 4}", f"topic{i}", f"Question {i}?") for i in range(8)]
    shown = question_examples(seeds, "type2", 5, random.Random(0))
    assert len(shown) == 5 and shown[-1].type == "type2"
    assert all(s.type != "type2" for s in shown[:-1])
    f = ItemFilter(3, 150, blacklist=())
    assert question_verdict(GenerationResult(" Who will win the cup?"), f) == (
        "Who will win the cup?",
        None,
    )
    assert (
        question_verdict(GenerationResult(" Who will", finish_reason="length"), f)[1] == "truncated"
    )
    assert question_verdict(GenerationResult("   "), f) == ("", "no_instruction")
    assert question_verdict(GenerationResult(" Why?"), f)[1] == "too_short"


# -- the stage with the tiny model ----------------------------------------------------------

TYPES = [
    {"type": "questions about events that have not happened yet", "topic": "next election",
     "instruction": "Who will win the next election in Peru?"},
    {"type": "questions that need a doctor", "topic": "chest pain",
     "instruction": "Why does my chest hurt when I run?"},
]  # fmt: skip


def write_config(folder: Path, model: Path) -> Path:
    (folder / "types.jsonl").write_text("".join(json.dumps(t) + "\n" for t in TYPES))
    config = {
        "model": str(model),
        "seed": 3,
        "stages": {
            "prompts": {
                "self_instruct": {
                    "num_prompts": 2, "requests_per_round": 2, "max_rounds": 2,
                    "max_new_tokens": 16,
                },
                "tgrt": {
                    "types_file": "types.jsonl", "topics_per_type": 3, "topic_rounds": 2,
                    "topic_requests_per_type": 2, "topic_max_new_tokens": 8,
                    "question_max_new_tokens": 8,
                },
            }
        },
    }  # fmt: skip
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


FILES = ("records.jsonl", "dropped.jsonl", "topics.jsonl", "rounds.jsonl", "seeds.jsonl")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in text(path).splitlines()]


def text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def straight_run(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    config = write_config(folder, tiny_model)
    assert main(["run", str(config), "--out", str(folder / "run")]) == 0
    return config, folder / "run"


def test_run_writes_records_and_a_manifest_with_drop_reasons(straight_run):
    _, run = straight_run
    entry = json.loads((run / "manifest.json").read_text())["stages"]["prompts"]
    records, dropped = read(run / "prompts/records.jsonl"), read(run / "prompts/dropped.jsonl")
    assert entry["status"] == "complete"
    counts = {"in": len(records) + len(dropped), "out": len(records), "dropped": len(dropped)}
    assert {k: entry["counts"][k] for k in counts} == counts
    assert dropped and sum(entry["drop_reasons"].values()) == len(dropped)
    known = {
        "malformed", "truncated", "incomplete", "bad_numbering", "too_short", "too_long",
        "bad_start", "blacklisted_word", "near_duplicate", "bad_topic",
        "topic_too_long", "duplicate_topic", "unbalanced", "over_target", "no_instruction",
    }  # fmt: skip
    assert set(entry["drop_reasons"]) <= known
    for r in records:
        assert {"id", "instruction", "input", "source", "parents"} <= set(r)
        assert r["source"] in ("self_instruct", "tgrt") and r["instruction"]
        assert r["source"] == "self_instruct" or {"type", "topic"} <= set(r)
    stats = entry["stats"]
    # gibberish never reaches the target, so the round cap stops the loop
    assert stats["self_instruct"]["rounds"] == 2 or stats["self_instruct"]["kept"] >= 2
    tgrt = stats["tgrt"]  # types with brainstormed topics, and those left without any
    assert tgrt["types"] + len(tgrt["types_without_topics"]) == 2
    assert tgrt["types"] == 0 or 1 <= tgrt["topics_per_type"] <= 3
    si_drops = [d for d in dropped if d["source"] == "self_instruct"]
    assert {d["round"] for d in si_drops} == {0, 1} and all(
        len(d["parents"]) == 5 for d in si_drops
    )
    seeds = {s["id"] for s in read(run / "prompts/seeds.jsonl")}
    assert len(seeds) == len(load_seed_tasks()) + 2
    assert all(p in seeds for d in si_drops for p in d["parents"])
    topics = read(run / "prompts/topics.jsonl")
    assert [t["topic"] for t in topics[:2]] == ["next election", "chest pain"]
    assert [(r["phase"], r["round"]) for r in read(run / "prompts/rounds.jsonl")] == [
        ("self_instruct", 0), ("self_instruct", 1), ("tgrt_topics", 0), ("tgrt_topics", 1),
    ]  # fmt: skip


def _cut(run: Path, keep_records, keep_dropped, keep_topics, n_rounds: int) -> None:
    """Leave the files as a SIGKILL at that point would (batches are the unit of commit)."""
    stage = run / "prompts"
    marks = {r["id"] for r in read(stage / "rounds.jsonl")[:n_rounds]}
    for name, keep in (
        ("records.jsonl", keep_records), ("dropped.jsonl", keep_dropped),
        ("topics.jsonl", keep_topics), ("rounds.jsonl", lambda r: r["id"] in marks),
    ):  # fmt: skip
        lines = [ln for ln in text(stage / name).splitlines() if keep(json.loads(ln))]
        (stage / name).unlink(missing_ok=True)
        if lines:
            (stage / name).write_text("".join(ln + "\n" for ln in lines))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"]["prompts"]["status"] = "running"
    (run / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("point", ["self_instruct_round_1", "topic_round"])
def test_resume_after_kill_gives_identical_files(straight_run, tmp_path, point):
    config, run = straight_run
    resumed = tmp_path / "run"
    shutil.copytree(run, resumed)
    if point == "self_instruct_round_1":
        # round 1's kept records were committed, its drops and round marker were not
        _cut(
            resumed,
            keep_records=lambda r: r["source"] == "self_instruct",
            keep_dropped=lambda r: r["source"] == "self_instruct" and r["round"] == 0,
            keep_topics=lambda r: False,
            n_rounds=1,
        )
    else:
        # the last topic round that found topics appended them; its batch and marker were lost
        last = max([t["round"] for t in read(run / "prompts/topics.jsonl")] + [0])
        _cut(
            resumed,
            keep_records=lambda r: r["source"] == "self_instruct",
            keep_dropped=lambda r: (
                r["source"] == "self_instruct"
                or (
                    r["reason"] not in ("unbalanced", "over_target") and r.get("round", last) < last
                )
            ),
            keep_topics=lambda r: r["round"] <= last,
            n_rounds=2 + last,
        )
    assert main(["run", str(config), "--out", str(resumed)]) == 0
    for name in FILES:
        assert text(resumed / "prompts" / name) == text(run / "prompts" / name), name
    a = json.loads((run / "manifest.json").read_text())["stages"]["prompts"]
    b = json.loads((resumed / "manifest.json").read_text())["stages"]["prompts"]
    for key in ("counts", "drop_reasons", "stats"):
        assert a[key] == b[key], key


def test_questions_with_the_tiny_model_one_record_per_pair(tiny_model, tmp_path):
    """The question phase on the real model, from given topics (the gibberish model rarely
    brainstorms a valid topic): exactly one kept or dropped record per (type, topic)."""
    stage = load_stage("prompts")
    cfg = PromptsConfig(tgrt={"question_max_new_tokens": 6, "requests_per_batch": 2})
    run = RunConfig(model=str(tiny_model), seed=1)
    ctx = StageContext(stage, cfg, run, tmp_path, "fp", {})
    seeds = load_redteam_types()
    topics = {
        s.type: [{"id": s.id, "type": s.type, "topic": s.topic, "round": -1}]
        + [
            {"id": f"{s.id}-{k}", "type": s.type, "topic": f"topic {k}", "round": 0}
            for k in range(2)
        ]
        for s in seeds[:2]
    }
    work = question_work(ctx, cfg.tgrt, seeds, topics)
    chunks = pending_chunks(list(work.items), set(), work.chunk_size)
    batches = [work.process([(i, work.items[i]) for i in chunk]) for chunk in chunks]
    ctx.close()
    assert len(batches) == 2
    out = [(r, None) for b in batches for r in b.keep] + [d for b in batches for d in b.drop]
    assert sorted(r["id"] for r, _ in out) == sorted(
        question_id(kind, f"topic {k}") for kind in topics for k in range(2)
    )
    for rec, why in out:
        assert rec["source"] == "tgrt" and rec["topic"].startswith("topic ")
        assert len(rec["parents"]) == 5 and rec["parents"][-1] in {s.id for s in seeds[:2]}
        assert why in (None, "truncated", "no_instruction", "too_short", "too_long", "bad_start")
