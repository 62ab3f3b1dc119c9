"""Training logs: ``report_to`` and ``logging_steps`` reach the trainers (SFT and MoTE), the
TensorBoard event files land in the model folder, and a missing package is bad input."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from selfalign.errors import InputError
from selfalign.train import TrainConfig, parse_train_config, train_sft
from selfalign.train.reporting import REPORT_TARGETS, check_reporting
from selfalign.train.sft import inputs_fingerprint

SYSTEM = "You are Tester, a careful assistant."
EXAMPLES = [
    {"prompt": "What is 2 plus 3?", "answer": "2 plus 3 is 5."},
    {"prompt": "Name a primary colour.", "answer": "Red is a primary colour."},
    {"prompt": "Say hello in French.", "answer": "Bonjour !"},
    {"prompt": "List two fruits.", "answer": "1. Apple\n2. Pear"},
]
FAST = {
    "max_steps": 4,
    "warmup_ratio": 0.0,
    "per_device_batch_size": 2,
    "global_batch_size": 2,
    "gradient_checkpointing": False,
}


def scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_logs_every_step_into_the_model_folder(tiny_model: Path, tmp_path: Path):
    out = tmp_path / "model"
    cfg = TrainConfig(**FAST, report_to=["tensorboard"], logging_steps=1)
    result = train_sft(EXAMPLES, tiny_model, out, cfg, system_text=SYSTEM)
    files = list((out / "logs").glob("events.out.tfevents.*"))
    assert len(files) == 1 and not (out / "checkpoints").exists()
    losses = scalars(out / "logs", "train/loss")
    assert [step for step, _ in losses] == [1, 2, 3, 4]
    want = [h["loss"] for h in result.history]
    assert [v for _, v in losses] == pytest.approx(want, rel=1e-5)


def test_logging_dir_and_interval_are_honoured(tiny_model: Path, tmp_path: Path):
    logs = tmp_path / "elsewhere"
    cfg = TrainConfig(**FAST, report_to="tensorboard", logging_steps=2, logging_dir=logs)
    train_sft(EXAMPLES, tiny_model, tmp_path / "model", cfg, system_text=SYSTEM)
    assert not (tmp_path / "model" / "logs").exists()
    assert [step for step, _ in scalars(logs, "train/loss")] == [2, 4]


def test_off_by_default_and_with_none(tiny_model: Path, tmp_path: Path):
    assert TrainConfig().report_to == []
    cfg = TrainConfig(**FAST, report_to=["none"])
    train_sft(EXAMPLES, tiny_model, tmp_path / "model", cfg, system_text=SYSTEM)
    assert not (tmp_path / "model" / "logs").exists()
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_a_missing_package_is_an_input_error_before_training(tiny_model: Path, tmp_path: Path):
    if importlib.util.find_spec("swanlab") is not None:
        pytest.skip("swanlab is installed here")
    cfg = TrainConfig(**FAST, report_to=["tensorboard", "swanlab"])
    with pytest.raises(InputError, match=r"pip install swanlab") as err:
        train_sft(EXAMPLES, tiny_model, tmp_path / "model", cfg, system_text=SYSTEM)
    assert err.value.field == "report_to"
    assert not (tmp_path / "model").exists()  # nothing trained, nothing written
    check_reporting(["tensorboard", "none"])  # installed (the dev extra)


def test_names_are_transformers_integrations_and_a_typo_names_the_field():
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    assert set(REPORT_TARGETS) == set(INTEGRATION_TO_CALLBACK)
    with pytest.raises(InputError, match="tensorboard") as err:
        parse_train_config({"report_to": ["tensorbord"]}, file="run.yaml")
    assert err.value.field == "report_to.0"
    assert parse_train_config({"report_to": "wandb"}).report_to == ["wandb"]


def test_logging_settings_do_not_change_the_checkpoint_fingerprint(tiny_model: Path):
    plain = TrainConfig(**FAST)
    logged = TrainConfig(**FAST, report_to=["tensorboard"], logging_dir="/tmp/x", logging_steps=5)
    assert inputs_fingerprint(EXAMPLES, tiny_model, plain, SYSTEM) == inputs_fingerprint(
        EXAMPLES, tiny_model, logged, SYSTEM
    )


def test_mote_training_logs_to_tensorboard(tiny_model: Path, tmp_path: Path):
    from selfalign.mote import MoteTrainConfig, train_mote

    chains = [
        {"question": "What is two plus two?", "analysis": None, "guidance": None,
         "answer": "Four."},
        {"question": "Write a line about cats.", "analysis": "Harmless.", "guidance": "Short.",
         "answer": "Cats nap where the sun falls."},
    ]  # fmt: skip
    config = MoteTrainConfig(
        max_steps=2, batch_size=2, warmup=0, progress=False, device="cpu", logging_steps=1,
        report_to=["tensorboard"],
    )  # fmt: skip
    train_mote(chains, tiny_model, tmp_path / "mote", config)
    assert [step for step, _ in scalars(tmp_path / "mote" / "logs", "train/loss")] == [1, 2]
    if importlib.util.find_spec("swanlab") is None:
        with pytest.raises(InputError, match=r"pip install swanlab"):
            train_mote(chains, tiny_model, tmp_path / "b", config.model_copy(
                update={"report_to": ["swanlab"]}))  # fmt: skip
        assert not (tmp_path / "b").exists()
