"""Model and dataset cards on a real run, and ``selfalign export`` loading back.

One small SELF-ALIGN run on the tiny model through the real runner (stages 1-2 run for
real and are then given hand-written records, as in test_engrave_verbose; engraving with
a merge, verbose cloning and a held-out eval are the real code), then: the cards the
runner wrote, the export read back with ``datasets`` and ``from_pretrained``, and the
errors. Nothing touches a network.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from huggingface_hub import DatasetCard, ModelCard

from selfalign.cli import main
from selfalign.stages.training import PLAIN_SYSTEM_TEXT
from selfalign.store import JsonlWriter, read_records, record_id

PAIRS = [
    ("What is the boiling point of water at sea level?",
     "Water boils at 100 degrees Celsius at sea level."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
]  # fmt: skip
TRAIN = {"max_steps": 2, "warmup_steps": 0, "per_device_batch_size": 4, "global_batch_size": 4,
         "learning_rate": 1e-3, "max_length": 96, "save_steps": 2,
         "gradient_checkpointing": False}  # fmt: skip
TURN_END = {"prompts": 2, "max_new_tokens": 8}
MODELS = {"engraved": "engraved", "engraved/merged": "engraved", "verbose/model": "final",
          "verbose/adapter": "final"}  # fmt: skip
SETS = ("prompts", "aligned", "verbose")
TRUTHFULQA = Path(__file__).resolve().parents[2] / "shared" / "data" / "truthfulqa" / "mc_task.json"


@pytest.fixture(scope="module")
def run_dir(pretrained_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A base that has seen our formats, whose engraved teacher ends its answers, so verbose
    # cloning keeps some; everything else is as small as the stages allow.
    stages = {
        "prompts": {"self_instruct": {"enabled": False}, "tgrt": {"enabled": False}},
        "aligned": {"max_new_tokens": 4},
        "engraved": {"train": {**TRAIN, "max_steps": 32, "learning_rate": 5e-3, "merge": True},
                     "turn_end": TURN_END},
        "verbose": {"max_new_tokens": 48, "min_words": 1, "temperature": 0.0, "train": TRAIN,
                    "turn_end": TURN_END},
        "eval": {"heldout": {"kinds": ["benign"], "max_new_tokens": 8, "icl": False}},
    }  # fmt: skip
    if TRUTHFULQA.is_file():  # the eval data beside the checkout: Hub eval results too
        stages["eval"]["truthfulqa"] = {"data": str(TRUTHFULQA), "protocols": ["lm-eval"],
                                        "limit": 2}  # fmt: skip
    root = tmp_path_factory.mktemp("export")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({"model": str(pretrained_model), "stages": stages}))
    run = root / "run"
    assert main(["run", str(config), "--out", str(run), "--until", "aligned"]) == 0
    prompts = [
        {"id": record_id("prompt", q), "instruction": q, "input": "", "source": "self_instruct"}
        for q, _ in PAIRS
    ]
    JsonlWriter(run / "prompts" / "records.jsonl").append(prompts)
    JsonlWriter(run / "aligned" / "records.jsonl").append(
        {"id": record_id(p["id"], q), "prompt_id": p["id"], "prompt": q, "answer": a,
         "thoughts": "", "principles": [3]}
        for p, (q, a) in zip(prompts, PAIRS, strict=True)
    )  # fmt: skip
    assert main(["run", str(config), "--out", str(run)]) == 0
    manifest = json.loads((run / "manifest.json").read_text())["stages"]
    assert all(manifest[s]["status"] == "complete" for s in (*SETS, "engraved", "eval"))
    assert read_records(run / "verbose" / "records.jsonl"), "the teacher kept no answer"
    return run


def front_matter(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_the_runner_writes_cards_for_every_model_and_record_set(
    run_dir: Path, pretrained_model: Path, tmp_path: Path
) -> None:
    from datasets import load_dataset

    evals = {
        (r["model"], r["benchmark"]): r for r in read_records(run_dir / "eval" / "records.jsonl")
    }
    for folder, eval_name in MODELS.items():
        card = ModelCard.load(run_dir / folder / "README.md")
        assert card.data.base_model == str(pretrained_model)
        assert card.data.license == "other" and card.data.pipeline_tag == "text-generation"
        adapter = (run_dir / folder / "adapter_config.json").is_file()
        assert card.data.library_name == ("peft" if adapter else "transformers")
        template = (run_dir / folder / "chat_template.jinja").read_text()
        assert template in card.text  # shown as it is, in a fenced block
        assert ("AutoPeftModelForCausalLM" in card.text) == adapter
        assert ("--enable-lora" if adapter else f"vllm serve {run_dir / folder}\n") in card.text
        # The eval stage ran after the training stages: their cards gained its numbers.
        heldout = evals[eval_name, "heldout"]["metrics"]
        stop = next(m for m in heldout if m["metric"] == "self_stop_rate")
        row = next(line for line in card.text.splitlines() if "| self_stop_rate |" in line)
        assert f"| {stop['value']:.4g} | {stop['n']} |" in row
        if TRUTHFULQA.is_file():  # multiple-choice scores also go in the Hub's model-index
            scores = {m["metric"]: m["value"] for m in evals[eval_name, "truthfulqa"]["metrics"]}
            index = {r.metric_type: r.metric_value for r in card.data.eval_results}
            assert index == scores and set(scores) == {"mc1", "mc2"}
        # Provenance: stages, checks after training, annotation files with line counts.
        assert "| aligned | complete |" in card.text and "principles.yaml" in card.text
        assert "End of turn on held-out prompts" in card.text
        assert "Sable" in card.text and "check the base model's license" in card.text

    assert not (run_dir / "eval" / "README.md").exists()  # results, not a record set
    for stage in SETS:
        card = DatasetCard.load(run_dir / stage / "README.md")
        assert card.data.configs[0]["data_files"][0]["path"] == "records.jsonl"
        records = read_records(run_dir / stage / "records.jsonl")
        assert f"- Records: {len(records)} kept" in card.text
        loaded = load_dataset(str(run_dir / stage), split="train", cache_dir=str(tmp_path))
        assert loaded["id"] == [r["id"] for r in records]


def expected_messages(stage: str, record: dict[str, Any], system: str) -> list[dict[str, str]]:
    if stage == "prompts":
        return [{"role": "user", "content": record["instruction"]}]
    return [{"role": "system", "content": system}, {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["answer"]}]  # fmt: skip


def test_export_loads_back_with_datasets_and_from_pretrained(
    run_dir: Path, pretrained_model: Path, tmp_path: Path
) -> None:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    assert main(["export", str(run_dir), str(out)]) == 0
    assert sorted(p.name for p in (out / "datasets").iterdir()) == sorted(SETS)
    assert sorted(p.name for p in (out / "models").iterdir()) == ["engraved", "final"]

    system = json.loads((run_dir / "engraved" / "train_log.json").read_text())["system_text"]
    assert system == PLAIN_SYSTEM_TEXT.replace("{name}", "Sable")
    for stage in SETS:
        folder = out / "datasets" / stage
        assert (folder / "data" / "train-00000-of-00001.parquet").is_file()
        card = DatasetCard.load(folder / "README.md")
        assert card.data.configs[0]["data_files"][0]["path"].startswith("data/")
        assert f"from `{pretrained_model}`" in card.text
        records = read_records(run_dir / stage / "records.jsonl")
        loaded = load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "cache"))
        assert loaded["id"] == [r["id"] for r in records]
        assert loaded["messages"] == [expected_messages(stage, r, system) for r in records]
        for field in records[0]:  # every record field is a column, values as written
            assert loaded[field] == [r.get(field) for r in records], field

    # engraved: the run merged it, so its merged weights are the exported model.
    engraved = out / "models" / "engraved"
    assert not (engraved / "adapter_config.json").exists()
    assert not any((engraved / n).exists() for n in ("training_args.bin", "turn_end.jsonl"))
    for name in ("engraved", "final"):
        folder = out / "models" / name
        card = ModelCard.load(folder / "README.md")
        assert (
            card.data.base_model == str(pretrained_model)
            and card.data.library_name == "transformers"
        )
        assert f'from_pretrained("{folder}")' in card.text
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hello"}], add_generation_prompt=True,
            return_tensors="pt", return_dict=True,
        )  # fmt: skip
        generated = model.generate(**ids, max_new_tokens=4, do_sample=False)
        assert generated.shape[1] > ids["input_ids"].shape[1]
    assert not list(tmp_path.glob(".out.*"))  # no temporary folder left beside OUT


def test_an_adapter_is_exported_when_the_run_did_not_merge(
    run_dir: Path, pretrained_model: Path, tmp_path: Path
) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    shutil.rmtree(run / "engraved" / "merged")
    out = tmp_path / "out"
    assert main(["export", str(run), str(out)]) == 0
    folder = out / "models" / "engraved"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(pretrained_model)  # local: loads offline
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model == str(pretrained_model)
    model = AutoPeftModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("### User:\nHello\n\n### Assistant:\n", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > ids.input_ids.shape[1]


def test_export_refuses_bad_input_and_leaves_nothing(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert main(["export", str(run_dir), str(busy)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]

    assert main(["export", str(tmp_path), str(tmp_path / "a")]) == 2
    assert "not a run directory" in capsys.readouterr().err

    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main(["export", str(run_dir), str(tmp_path / "b"), "--push", "me/sable"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HF_TOKEN" in err
    assert main(["export", str(run_dir), str(tmp_path / "c"), "--push", "no-org"]) == 2
    capsys.readouterr()
    # With a token, a base model known only by its local path stops the push before any
    # upload: the Hub's base_model field needs an id.
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    assert main(["export", str(run_dir), str(tmp_path / "d"), "--push", "me/sable"]) == 2
    assert "--base-model" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_status_and_report_write_no_cards(run_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    for card in run.rglob("README.md"):
        card.unlink()
    assert main(["status", str(run)]) == 0
    assert main(["report", str(run)]) == 0
    assert not list(run.rglob("README.md"))


def test_cards_show_cost_and_environment_and_never_a_secret(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from selfalign.cards import write_cards

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    secret = "sk-do-not-leak-0123456789"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    manifest = json.loads((run / "manifest.json").read_text())
    # An environment record that (wrongly) caught the key must not carry it into a card.
    records = [manifest.setdefault("environment", {}), *manifest.get("environments", {}).values()]
    for record in records:
        record.update(python="3.11", command=f"run --key {secret}")
    manifest["stages"]["engraved"]["cost"] = {"seconds": 12.5, "device_hours": 0.25}
    written = write_cards(run, manifest)
    assert len(written) == len(MODELS) + len(SETS)
    text = (run / "engraved" / "README.md").read_text()
    assert "## Environment" in text and "- python: 3.11" in text
    cost = text.split("## Cost\n\n")[1].split("\n\n")[0].splitlines()
    header = [c.strip() for c in cost[0].strip("|").split("|")]
    row = [c.strip() for c in next(r for r in cost if r.startswith("| engraved |")).split("|")]
    assert row[1 + header.index("seconds")] == "12.5"
    assert row[1 + header.index("device_hours")] == "0.25"
    for card in written:
        assert secret not in card.read_text()
    assert "[redacted]" in text


def test_a_field_of_mixed_types_is_kept_as_json_text(tmp_path: Path) -> None:
    from datasets import load_dataset

    from selfalign.export import write_parquet

    rows = [{"id": "a", "verdict": True, "extra": {}}, {"id": "b", "verdict": "unsure"},
            {"id": "c", "verdict": None, "extra": {}}]  # fmt: skip
    path = tmp_path / "data" / "train-00000-of-00001.parquet"
    assert write_parquet(rows, path) == ["verdict", "extra"]
    loaded = load_dataset("parquet", data_files=str(path), split="train",
                          cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert loaded["verdict"] == ["true", '"unsure"', None]
    assert loaded["extra"] == ["{}", None, "{}"]


def test_the_base_model_license_and_hub_id_come_from_its_folder(tmp_path: Path) -> None:
    from selfalign.model_origin import find_hub_id, find_license, model_origin

    gemma = tmp_path / "gemma-3-270m"
    gemma.mkdir()
    (gemma / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    (gemma / "conversion.json").write_text(json.dumps({"gguf_file": "gemma-3-270m-q4_k_m.gguf"}))
    origin = model_origin(f"hf:{gemma}")
    assert origin.hub_id == "google/gemma-3-270m" and origin.ref == "google/gemma-3-270m"
    assert origin.license.id == "gemma" and origin.license.link

    snapshot = tmp_path / "hub" / "models--acme--tiny-7b" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert find_hub_id(snapshot) == "acme/tiny-7b"
    assert find_license(snapshot).id == "other"  # a llama architecture says nothing
    (snapshot / "LICENSE").write_text("Apache License\nVersion 2.0, January 2004\n")
    assert find_license(snapshot).id == "apache-2.0"
    (snapshot / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    assert find_license(snapshot).source == "README.md metadata"
