"""Cost per stage and estimates before a run, on a real tiny run through the CLI.

The run: stage 1 with its generators off plus the shipped seed tasks as its records (the
tiny model writes no usable prompts), stage 2 for real on the tiny model (generation, so
backend token counts), then engraving for real (a LoRA, two optimizer steps) on
hand-written pairs. The backend block prices tokens, and device-hours for training.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from selfalign.annotations.loaders import load_seed_tasks
from selfalign.cli import main
from selfalign.cost import format_money, format_tokens
from selfalign.pipeline import Manifest
from selfalign.stages.engrave import EngraveConfig
from selfalign.store import JsonlWriter, record_id

PRICE_PROMPT, PRICE_COMPLETION, PRICE_HOUR = 1.5, 6.0, 2.0
TRAIN = {"max_steps": 2, "warmup_steps": 0, "per_device_batch_size": 2, "global_batch_size": 2,
         "max_length": 64, "save_steps": 10, "gradient_checkpointing": False}  # fmt: skip
PAIRS = [
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("What do bees make?", "Bees make honey and wax."),
    ("Is the Sun a star?", "Yes, the Sun is a star."),
]


def write_config(path: Path, model: Path, **backend: object) -> Path:
    engraved: dict = {"train": TRAIN}
    if "turn_end" in EngraveConfig.model_fields:  # its held-out check is not what this tests
        engraved["turn_end"] = {"prompts": 0}
    config = {
        "model": str(model),
        "backend": {"model": str(model), "batch_size": 4, **backend},
        "stages": {
            "prompts": {"self_instruct": {"enabled": False}, "tgrt": {"enabled": False}},
            "aligned": {"max_new_tokens": 8, "chunk_size": 4},
            "engraved": engraved,
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def stages(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["stages"]


def tree(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))}  # fmt: skip


@pytest.fixture(scope="module")
def priced_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("cost")
    cfg = write_config(
        tmp / "run.yaml", tiny_model,
        price_per_million_prompt_tokens=PRICE_PROMPT,
        price_per_million_completion_tokens=PRICE_COMPLETION,
        price_per_device_hour=PRICE_HOUR,
    )  # fmt: skip
    run_dir = tmp / "run"
    assert main(["run", str(cfg), "--out", str(run_dir), "--until", "prompts"]) == 0
    rows = [{"id": record_id("self_instruct", t.id), "instruction": t.instruction,
             "input": t.input, "source": "self_instruct"} for t in load_seed_tasks()[:4]]  # fmt: skip
    JsonlWriter(run_dir / "prompts" / "records.jsonl").append(rows)
    Manifest(run_dir).update("prompts", counts={"in": 4, "out": 4, "dropped": 0, "failed": 0})
    assert main(["run", str(cfg), "--out", str(run_dir), "--only", "aligned"]) == 0
    pairs = [{"id": record_id("pair", q), "prompt": q, "answer": a} for q, a in PAIRS]
    JsonlWriter(run_dir / "aligned" / "records.jsonl").append(pairs)
    assert main(["run", str(cfg), "--out", str(run_dir), "--only", "engraved"]) == 0
    return cfg, run_dir


def test_each_stage_records_its_cost_from_its_usage_time_and_prices(priced_run) -> None:
    _, run_dir = priced_run
    entries = stages(run_dir)

    aligned = entries["aligned"]
    usage, cost = aligned["usage"], aligned["cost"]
    assert usage["requests"] == 4 and usage["completion_tokens"] > 0
    assert (cost["prompt_tokens"], cost["completion_tokens"]) == (
        usage["prompt_tokens"], usage["completion_tokens"],
    )  # fmt: skip
    assert cost["seconds"] == pytest.approx(aligned["timings"]["seconds"], abs=1e-3)
    # a token price wins: hosted-API pricing, the device-hours are still shown (hf: 1 device)
    want = usage["prompt_tokens"] * PRICE_PROMPT + usage["completion_tokens"] * PRICE_COMPLETION
    assert cost["money"] == pytest.approx(want / 1e6, rel=1e-6)
    assert cost["currency_basis"] == "tokens"
    assert cost["device_hours"] == pytest.approx(cost["seconds"] / 3600, rel=1e-3)

    engraved = entries["engraved"]
    cost, stats = engraved["cost"], engraved["stats"]
    assert stats["runtime_s"] > 0 and not engraved["usage"]  # trains, generates nothing
    # training: launch.num_processes (1) devices for the whole stage, at the run's hourly price
    assert cost["device_hours"] == pytest.approx(engraved["timings"]["seconds"] / 3600, rel=1e-3)
    assert cost["money"] == pytest.approx(cost["device_hours"] * PRICE_HOUR, rel=1e-3)
    assert cost["currency_basis"] == "device-hours"
    assert cost["train_tokens"] == stats["train_tokens"] > 0


def test_status_shows_tokens_time_and_money_per_stage_and_writes_nothing(
    priced_run, tmp_path: Path, capsys
) -> None:
    _, run_dir = priced_run
    before = tree(run_dir)
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert tree(run_dir) == before
    header = next(line for line in out.splitlines() if line.startswith("stage"))
    assert header.split()[-7:] == ["time", "tok", "in", "tok", "out", "dev-h", "money"]
    costs = {n: e["cost"] for n, e in stages(run_dir).items()}
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    aligned = costs["aligned"]
    assert rows["aligned"][-4:] == [
        format_tokens(aligned["prompt_tokens"]), format_tokens(aligned["completion_tokens"]),
        f"{aligned['device_hours']:.3f}", format_money(aligned["money"]),
    ]  # fmt: skip
    assert rows["engraved"][-1] == format_money(costs["engraved"]["money"])
    assert f"trained on {format_tokens(costs['engraved']['train_tokens'])} tokens" in out
    total = sum(c["money"] for c in costs.values() if c["money"] is not None)
    assert rows["total"][-1] == format_money(total)
    assert "money charged by tokens+device-hours" in out

    # A run directory from before costs were recorded: the same numbers, from config.yaml.
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for entry in manifest["stages"].values():
        entry.pop("cost")
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert main(["status", str(old)]) == 0
    again = capsys.readouterr().out
    assert again.splitlines()[1:] == out.splitlines()[1:]


def test_report_stage_table_has_the_cost_columns(priced_run, tmp_path: Path) -> None:
    _, run_dir = priced_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    assert main(["report", str(copy)]) == 0
    page = (copy / "report.html").read_text()
    for column in ("prompt tokens", "completion tokens", "trained tokens", "device-hours", "money"):
        assert f"<th>{column}</th>" in page
    money = stages(copy)["aligned"]["cost"]["money"]
    assert f"<td>{format_money(money)} (tokens)</td>" in page


def dry_run(cfg: Path, run_dir: Path, capsys) -> str:
    assert main(["run", str(cfg), "--out", str(run_dir), "--dry-run"]) == 0
    return capsys.readouterr().out


def fresh_config(path: Path, model: Path, **backend: object) -> Path:
    config = {
        "model": str(model),
        "backend": {"model": str(model), **backend},
        "stages": {
            "prompts": {"self_instruct": {"num_prompts": 6, "requests_per_round": 2,
                                          "max_rounds": 3, "max_new_tokens": 16},
                        "tgrt": {"enabled": False}},
            "aligned": {"max_new_tokens": 8, "max_prompts": 4},
        },
    }  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    return path


def test_dry_run_estimates_tokens_time_and_money_and_writes_nothing(
    tiny_model: Path, tmp_path: Path, capsys
) -> None:
    run_dir = tmp_path / "run"
    cfg = fresh_config(tmp_path / "a.yaml", tiny_model)
    before = tree(tmp_path)
    out = dry_run(cfg, run_dir, capsys)
    assert tree(tmp_path) == before  # not even the run directory
    # self-instruct: 3 rounds x 2 requests, 16 tokens each; aligned: 4 prompts x 8 tokens
    assert re.search(
        r"prompts .*\n .*estimate: at most 6 requests, \S+ prompt \+ 96 completion", out
    )
    assert re.search(
        r"aligned .*\n .*estimate: at most 4 requests, \S+ prompt \+ 32 completion", out
    )
    assert out.count("generation unknown (no throughput") == 2
    assert "cost: no price set" in out
    assert "total      estimate: at most 10 requests" in out and "time: unknown" in out

    # With a throughput and a price per generated token, time and money follow.
    cfg = fresh_config(tmp_path / "b.yaml", tiny_model, throughput_tokens_per_s=16,
                       price_per_million_completion_tokens=1_000_000)  # fmt: skip
    out = dry_run(cfg, run_dir, capsys)
    assert "6.0s generating at 16 tokens/s (backend.throughput_tokens_per_s); cost: 96.00" in out
    assert "2.0s generating at 16 tokens/s (backend.throughput_tokens_per_s); cost: 32.00" in out
    assert "time: 8.0s; cost: 128.00 (by tokens)" in out


def test_dry_run_reads_the_throughput_an_earlier_run_measured(
    priced_run, tmp_path: Path, capsys
) -> None:
    cfg, run_dir = priced_run
    config = yaml.safe_load(cfg.read_text())
    # a price is not an output setting: nothing re-runs for it
    config["backend"]["price_per_device_hour"] = 5.0
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    out = dry_run(changed, run_dir, capsys)
    assert [line.split()[1] for line in out.splitlines()[1:]] == ["reuse"] * 3

    config["stages"]["aligned"]["temperature"] = 0.3  # aligned and engraved re-run
    changed.write_text(yaml.safe_dump(config))
    before = tree(run_dir)
    out = dry_run(changed, run_dir, capsys)
    assert tree(run_dir) == before
    entries = stages(run_dir)
    aligned = entries["aligned"]
    rate = aligned["usage"]["completion_tokens"] / aligned["timings"]["seconds"]
    assert f"generating at {rate:,.0f} tokens/s (measured by an earlier run)" in out
    per_example = (
        entries["engraved"]["stats"]["runtime_s"] / entries["engraved"]["stats"]["examples"]
    )
    assert f"training ({per_example:.2f}s per example, measured by an earlier run)" in out
    # engraving's input is stage 2's estimate (4 prompts, one pair each at most)
    assert re.search(r"engraved .*\n .*estimate: at most 4 training examples", out)


def test_a_negative_price_is_exit_2_naming_the_field(tiny_model: Path, tmp_path: Path, capsys):
    cfg = fresh_config(tmp_path / "bad.yaml", tiny_model)
    config = yaml.safe_load(cfg.read_text())
    config["stages"]["aligned"]["backend"] = {"model": str(tiny_model), "price_per_device_hour": -1}
    cfg.write_text(yaml.safe_dump(config))
    assert main(["run", str(cfg), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "stages.aligned.backend.price_per_device_hour" in err
    assert "greater than or equal to 0" in err and len(err.strip().splitlines()) == 1


def test_train_tokens_are_the_tokens_trl_trains_on(tiny_model: Path, tmp_path: Path) -> None:
    from selfalign.train import TrainConfig, build_trainer
    from selfalign.train.sft import plan_training

    examples = [{"prompt": q, "answer": a} for q, a in PAIRS]
    examples += [
        {"prompt": "Count.", "answer": " ".join(f"n{i}" for i in range(200))},  # cut
        {"prompt": "word " * 300, "answer": "Nothing of it is learned."},
    ]  # dropped
    cfg = TrainConfig(**TRAIN)
    trainer = build_trainer(examples, tiny_model, tmp_path, cfg, system_text="Be brief.")
    plan = plan_training(examples, trainer.processing_class, cfg, "Be brief.")
    assert plan.tokens == sum(len(row["input_ids"]) for row in trainer.train_dataset)
    assert plan.dropped == 1 and plan.truncated == 1


def test_dry_run_turns_training_tokens_into_time_with_the_run_throughputs(
    tiny_model: Path, tmp_path: Path, capsys
) -> None:
    """Engraving 4 pairs at most (stage 2's estimate), 2 steps x global batch 2 x 64 tokens
    = 256 training tokens: 8 s at 32 tokens/s, from the user's number or from a GPU
    check's JSON; a JSON without its LoRA part is exit 2 naming the file and field."""
    cfg = fresh_config(tmp_path / "run.yaml", tiny_model)
    config = yaml.safe_load(cfg.read_text())
    config["stages"]["engraved"] = {"train": TRAIN}
    run_dir = tmp_path / "run"
    cfg.write_text(yaml.safe_dump(config))
    out = dry_run(cfg, run_dir, capsys)
    assert "training unknown (no earlier run of this stage measured it; set throughputs" in out

    config["throughputs"] = {"train_tokens_per_s": 32}
    cfg.write_text(yaml.safe_dump(config))
    out = dry_run(cfg, run_dir, capsys)
    assert (
        "8.0s training (at most 256 tokens at 32 tokens/s, throughputs.train_tokens_per_s)" in out
    )

    check = tmp_path / "gpu_check.json"
    lora = {"dtype": "bfloat16", "lora": {"r": 16}, "seq": 1024, "tokens_per_s": 32.0}
    check.write_text(json.dumps({"environment": {"device": "NVIDIA H200"}, "lora": lora}))
    config["throughputs"] = {"gpu_check": check.name}  # relative to the config's folder
    cfg.write_text(yaml.safe_dump(config))
    out = dry_run(cfg, run_dir, capsys)
    assert ("8.0s training (at most 256 tokens at 32 tokens/s, scripts/gpu_check.sh on "
            "NVIDIA H200: 8B bfloat16 LoRA r=16, seq 1024)") in out  # fmt: skip
    assert not run_dir.exists()

    check.write_text(json.dumps({"lora": {"error": "CUDA out of memory"}}))
    assert main(["run", str(cfg), "--out", str(run_dir), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gpu_check.json" in err
    assert "throughputs.gpu_check" in err and "CUDA out of memory" in err
