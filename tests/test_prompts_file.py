"""Stage 1 from the user's own prompts (``stages.prompts.file``): jsonl, parquet and a
saved dataset read through ``datasets``, drops for repeats and empty rows, the seeded
shuffle with a limit, plan-time errors naming the file and the setting, resume, the
fingerprint over the data, and the dry-run estimate. Self-Instruct and TGRT are off, so no
model generates anything: the tiny model is only the run's (required) model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from selfalign.cli import main
from selfalign.config import load_run_config
from selfalign.errors import InputError
from selfalign.pipeline import Runner
from selfalign.stages.prompts import PromptsConfig
from selfalign.stages.user_file import SOURCE, FileSourceConfig, read_rows, row_order, select
from selfalign.store import record_id

# What people put in a prompt file: requests, some with material to work on; one asked
# twice, one row with no instruction, one with a number where text belongs.
ROWS = [
    {"instruction": "How do I get red wine out of a cotton shirt?", "input": ""},
    {"instruction": "Summarize this paragraph in one sentence.",
     "input": "The city council voted on Tuesday to extend the bike lane on Main Street by two "
              "miles, citing a rise in cycling commuters and fewer accidents on the first stretch."},
    {"instruction": "  ", "input": ""},
    {"instruction": "Compare renting and buying a flat for someone who may move in two years.",
     "input": ""},
    {"instruction": "How do I get red wine out of a cotton shirt?", "input": ""},
    {"instruction": 42, "input": ""},
    {"instruction": "Write a short, polite email asking my landlord to fix a dripping tap.",
     "input": ""},
]  # fmt: skip
KEPT_ROWS = [0, 1, 3, 6]  # rows 2 and 5 are empty, row 4 repeats row 0
STAGE_FILES = ("records.jsonl", "dropped.jsonl")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_config(folder: Path, model: Path, file_block: dict) -> Path:
    config = {
        "model": str(model),
        "seed": 5,
        "stages": {
            "prompts": {
                "file": file_block,
                "self_instruct": {"enabled": False},
                "tgrt": {"enabled": False},
            }
        },
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def stage_entry(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["stages"]["prompts"]


@pytest.fixture(scope="module")
def jsonl_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("user_file")
    write_jsonl(folder / "my_prompts.jsonl", ROWS)
    config = write_config(folder, tiny_model, {"path": "my_prompts.jsonl", "input_field": "input"})
    assert main(["run", str(config), "--out", str(folder / "run")]) == 0
    return config, folder / "run"


def test_jsonl_rows_become_prompt_records_with_drops(jsonl_run) -> None:
    _, run_dir = jsonl_run
    records = read(run_dir / "prompts/records.jsonl")
    dropped = read(run_dir / "prompts/dropped.jsonl")
    assert [r["row"] for r in records] == KEPT_ROWS
    for r in records:
        row = ROWS[r["row"]]
        assert r == {
            "id": record_id(SOURCE, row["instruction"], row["input"]),
            "instruction": row["instruction"], "input": row["input"],
            "source": "user_file", "row": r["row"], "parents": [],
        }  # fmt: skip
    assert records[1]["input"].startswith("The city council voted")
    reasons = {d["row"]: d["reason"] for d in dropped}
    assert reasons == {2: "empty", 4: "duplicate", 5: "empty"}
    assert next(d for d in dropped if d["row"] == 4)["duplicate_of"] == records[0]["id"]
    assert next(d for d in dropped if d["row"] == 5)["instruction"] == 42  # kept as given
    entry = stage_entry(run_dir)
    assert entry["status"] == "complete"
    assert entry["counts"] == {"in": len(ROWS), "out": 4, "dropped": 3, "failed": 0}
    assert entry["drop_reasons"] == {"empty": 2, "duplicate": 1}
    assert entry["stats"]["user_file"] == {"kept": 4, "dropped": {"empty": 2, "duplicate": 1}}
    assert entry["stats"]["self_instruct"]["kept"] == entry["stats"]["tgrt"]["kept"] == 0
    assert not (run_dir / "prompts/rounds.jsonl").exists()  # no generator ran


def mark_running(run_dir: Path) -> None:
    """What a kill leaves in the manifest: the stage still marked running."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["stages"]["prompts"]["status"] = "running"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))


def test_a_rerun_writes_nothing_new(jsonl_run, capsys) -> None:
    config, run_dir = jsonl_run
    before = {name: (run_dir / "prompts" / name).read_bytes() for name in STAGE_FILES}
    mark_running(run_dir)  # killed after everything was committed
    assert main(["run", str(config), "--out", str(run_dir)]) == 0
    assert {name: (run_dir / "prompts" / name).read_bytes() for name in STAGE_FILES} == before
    mark_running(run_dir)  # killed between the kept records' commit and the drops'
    (run_dir / "prompts/dropped.jsonl").unlink()
    assert main(["run", str(config), "--out", str(run_dir)]) == 0
    assert {name: (run_dir / "prompts" / name).read_bytes() for name in STAGE_FILES} == before
    entry = stage_entry(run_dir)
    assert entry["status"] == "complete" and entry["counts"]["out"] == 4
    capsys.readouterr()
    assert main(["run", str(config), "--out", str(run_dir)]) == 0  # complete: reused
    assert "[prompts] reuse" in capsys.readouterr().err


def test_fingerprint_covers_the_data_file_and_nothing_else_changes(jsonl_run) -> None:
    config, _ = jsonl_run
    data = config.parent / "my_prompts.jsonl"

    def fingerprint() -> str:
        run, stages = load_run_config(config)
        return Runner(run, stages, config.parent / "scratch", config).plan()[0].fingerprint

    original = data.read_text()
    first = fingerprint()
    try:
        data.write_text(original.replace("dripping tap", "leaking tap"))
        assert fingerprint() != first
    finally:
        data.write_text(original)
    assert fingerprint() == first
    # a config without the file source dumps (and so fingerprints) as before it existed
    assert "file" not in PromptsConfig().model_dump()
    assert "file" not in PromptsConfig(file={"enabled": False, "path": "x.csv"}).model_dump()


def test_parquet_with_other_field_names_shuffle_and_limit(tiny_model: Path, tmp_path: Path) -> None:
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    questions = [
        "What should I pack for a three-day hike in autumn?",
        "Explain the difference between a Roth IRA and a traditional IRA.",
        "How long should I boil an egg for a runny yolk?",
        "Suggest five names for a bakery that sells sourdough.",
        "Translate the sentence into French.",
        "Give me a weekly plan to start running from zero.",
    ]
    context = ["", "", "", "", "The train leaves at noon.", ""]
    pq.write_table(pa.table({"prompt": questions, "context": context}), tmp_path / "p.parquet")
    block = {"path": "p.parquet", "instruction_field": "prompt", "input_field": "context",
             "shuffle": True, "limit": 4}  # fmt: skip
    config = write_config(tmp_path, tiny_model, block)
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 0
    records = read(tmp_path / "run/prompts/records.jsonl")
    expected = row_order(len(questions), seed=5, shuffle=True)[:4]
    assert [r["row"] for r in records] == expected != [0, 1, 2, 3]
    assert [r["instruction"] for r in records] == [questions[i] for i in expected]
    if 4 in expected:
        assert next(r for r in records if r["row"] == 4)["input"] == "The train leaves at noon."
    assert not (tmp_path / "run/prompts/dropped.jsonl").exists()  # the other two: not read


def test_a_saved_dataset_folder_and_its_train_split(tmp_path: Path) -> None:
    import datasets

    rows = [{"instruction": "Name three herbs that grow well indoors."},
            {"instruction": "What is a good first houseplant for a dark room?"}]  # fmt: skip
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
    ).save_to_disk(tmp_path / "saved")
    cfg = FileSourceConfig(path=tmp_path / "saved")
    assert cfg.enabled  # a path turns the source on
    batch = select(read_rows(cfg), cfg, seed=0)
    assert [r["instruction"] for r in batch.keep] == [r["instruction"] for r in rows]


def test_dry_run_estimates_the_prompts_the_file_gives(jsonl_run, tmp_path: Path, capsys) -> None:
    config, _ = jsonl_run
    assert main(["run", str(config), "--out", str(tmp_path / "fresh"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "user file: 4 prompts from 7 rows" in out
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize(
    "content, block, expected",
    [
        ('{"prompt": "How do I bleed a radiator?"}\n', {},
         r"{file}: stages.prompts.file.instruction_field: no field 'instruction' in the data "
         r"\(its fields: prompt\)"),
        ('{"instruction": "How do I bleed a radiator?"}\n', {"input_field": "context"},
         r"{file}: stages.prompts.file.input_field: no field 'context'"),
        ('{"instruction": "How do I bleed a radiator?"}\n{"instruction": "Why?",}\n', {},
         r"{file}:2: invalid JSON"),
        ("", {}, r"{file}: file is empty"),
    ],
)  # fmt: skip
def test_bad_file_or_field_exits_2_with_one_line(
    tiny_model: Path, tmp_path: Path, capsys, content: str, block: dict, expected: str
) -> None:
    data = tmp_path / "mine.jsonl"
    data.write_text(content)
    config = write_config(tmp_path, tiny_model, {"path": "mine.jsonl", **block})
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert re.fullmatch("error: " + expected.replace("{file}", re.escape(str(data))) + ".*", err)


def test_other_bad_inputs_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.csv: file not found"):
        read_rows(FileSourceConfig(path=tmp_path / "nope.csv"))
    (tmp_path / "prompts.txt").write_text("How do I bleed a radiator?\n")
    with pytest.raises(InputError, match=r"prompts\.txt: expected a \.jsonl, \.json"):
        read_rows(FileSourceConfig(path=tmp_path / "prompts.txt"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match=r"broken\.parquet: cannot read it with datasets"):
        read_rows(FileSourceConfig(path=tmp_path / "broken.parquet"))
    with pytest.raises(ValueError, match="path is required"):
        FileSourceConfig(enabled=True)


def test_csv_and_json_lists_read_through_datasets(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text(
        "instruction,input\n"
        'Rewrite this sentence in plain English.,"Pursuant to the aforementioned, we decline."\n'
        ",\n"
    )
    cfg = FileSourceConfig(path=tmp_path / "p.csv", input_field="input")
    batch = select(read_rows(cfg), cfg, seed=0)
    assert [(r["instruction"], r["input"]) for r in batch.keep] == [
        ("Rewrite this sentence in plain English.", "Pursuant to the aforementioned, we decline.")
    ]
    assert [why for _, why in batch.drop] == ["empty"]
    (tmp_path / "p.json").write_text(json.dumps(ROWS[:2]))
    cfg = FileSourceConfig(path=tmp_path / "p.json")  # no input_field: inputs left empty
    assert [r["input"] for r in select(read_rows(cfg), cfg, seed=0).keep] == ["", ""]
