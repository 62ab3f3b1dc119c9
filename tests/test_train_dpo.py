"""DPO training (``selfalign.train.dpo``) on the tiny model: continuing an adapter against
its frozen copy, a fresh LoRA on a fully fine-tuned start, kill and resume, bad pairs, and
two processes under ``accelerate launch``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfalign.errors import InputError
from selfalign.train import TrainConfig, train_sft
from selfalign.train.config import DPOSettings
from selfalign.train.dpo import train_dpo
from test_train_sft import EXAMPLES, FAST, SYSTEM, KillAtStep, Killed, launch_two_processes

REPO = Path(__file__).resolve().parents[1]
# chosen: the SFT answers; rejected: what a base model without principles tends to write
REJECTED = [
    "idk, look it up yourself.",
    "Colours are colours. Next question.",
    "Python is a snake.",
    "I will not translate that for you.",
    "Fruit is fruit, buy whatever.",
    "My team will win tomorrow, 3-0, guaranteed.",
    "Yes.",
    "Monday again, obviously.",
]
PAIRS = [
    {"prompt": e["prompt"], "chosen": e["answer"], "rejected": r}
    for e, r in zip(EXAMPLES, REJECTED, strict=True)
]
DPO_FAST = {**FAST, "learning_rate": 5e-3}


@pytest.fixture(scope="module")
def engraved(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engraved") / "model"
    train_sft(EXAMPLES, tiny_model, out, TrainConfig(**FAST), system_text=SYSTEM)
    return out


@pytest.fixture(scope="module")
def finished(engraved: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("dpo") / "model"
    return train_dpo(PAIRS, engraved, out, TrainConfig(**DPO_FAST), DPOSettings(),
                     system_text=SYSTEM)  # fmt: skip


def test_dpo_starts_at_ln2_against_the_engraved_copy_and_learns(finished, engraved: Path):
    losses = [h["loss"] for h in finished.history]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at start
    assert losses[-1] < losses[0]
    assert finished.history[-1]["rewards/margins"] > 0
    out = finished.model_dir
    config = json.loads((out / "adapter_config.json").read_text())
    start = json.loads((engraved / "adapter_config.json").read_text())
    # the engraved adapter itself trained on: same base, rank and modules, new weights
    assert config["base_model_name_or_path"] == start["base_model_name_or_path"]
    assert (config["r"], sorted(config["target_modules"])) == (
        start["r"], sorted(start["target_modules"]),
    )  # fmt: skip
    before, after = (
        load_file(engraved / "adapter_model.safetensors"),
        load_file(out / "adapter_model.safetensors"),
    )
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not (out / "ref").exists() and not (out / "checkpoints").exists()


def test_killed_dpo_resumes_to_the_uninterrupted_result(finished, engraved: Path, tmp_path: Path):
    out = tmp_path / "model"
    cfg = TrainConfig(**DPO_FAST)
    with pytest.raises(Killed):
        train_dpo(PAIRS, engraved, out, cfg, DPOSettings(), system_text=SYSTEM,
                  callbacks=[KillAtStep(5)])  # fmt: skip
    resumed = train_dpo(PAIRS, engraved, out, cfg, DPOSettings(), system_text=SYSTEM)
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith("checkpoint-4")
    want = [h["loss"] for h in finished.history]
    assert [h["loss"] for h in resumed.history] == pytest.approx(want, rel=1e-5)
    expected = load_file(finished.model_dir / "adapter_model.safetensors")
    got = load_file(out / "adapter_model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def test_a_fully_fine_tuned_start_gets_a_fresh_lora(tiny_model: Path, tmp_path: Path):
    start = tmp_path / "full"
    train_sft(EXAMPLES, tiny_model, start, TrainConfig(**{**FAST, "method": "full"}),
              system_text=SYSTEM)  # fmt: skip
    result = train_dpo(PAIRS, start, tmp_path / "dpo", TrainConfig(**DPO_FAST), DPOSettings(),
                       system_text=SYSTEM)  # fmt: skip
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    config = json.loads((tmp_path / "dpo" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]).resolve() == start.resolve()
    # generating with it puts the adapter on the model it was trained on, not the run's base
    from selfalign.backends import BackendConfig
    from selfalign.stages.training import trained_backend

    for spec in (str(tiny_model), "openai:http://localhost:8000/v1#base"):
        backend = trained_backend(BackendConfig(model=spec), tmp_path / "dpo")
        assert backend.model == f"hf:{start}" and backend.adapter == str(tmp_path / "dpo")


@pytest.mark.parametrize(
    ("pairs", "field"),
    [
        ([{**PAIRS[0], "chosen": " "}], "chosen"),
        ([{**PAIRS[0], "rejected": PAIRS[0]["chosen"]}], "rejected"),
        ([{"prompt": "hi", "chosen": "Hello!"}], "rejected"),
        ([], None),
    ],
)
def test_bad_pairs_and_full_method_are_input_errors(engraved, tmp_path, pairs, field):
    with pytest.raises(InputError) as err:
        train_dpo(pairs, engraved, tmp_path / "m", TrainConfig(**FAST), DPOSettings(),
                  system_text=SYSTEM)  # fmt: skip
    assert field is None or err.value.field == field
    with pytest.raises(InputError, match="LoRA or QLoRA"):
        train_dpo(PAIRS, engraved, tmp_path / "m", TrainConfig(method="full"), DPOSettings(),
                  system_text=SYSTEM)  # fmt: skip


def test_two_process_accelerate_launch_trains_dpo(engraved: Path, tmp_path: Path):
    examples = tmp_path / "pairs.jsonl"
    examples.write_text("".join(json.dumps(p) + "\n" for p in PAIRS), encoding="utf-8")
    config, dpo = tmp_path / "train.yaml", tmp_path / "dpo.yaml"
    config.write_text("max_steps: 2\nwarmup_steps: 1\nper_device_batch_size: 2\n"
                      "global_batch_size: 4\ngradient_checkpointing: false\n")  # fmt: skip
    dpo.write_text("beta: 0.2\n")
    out = tmp_path / "model"
    launch_two_processes(
        "selfalign.train", "--examples", str(examples), "--base", str(engraved), "--out",
        str(out), "--config", str(config), "--dpo", str(dpo), "--system", SYSTEM,
    )  # fmt: skip
    log = json.loads((out / "train_log.json").read_text())
    assert log["objective"] == "dpo" and log["processes"] == 2 and log["global_step"] == 2
    assert log["dpo"]["beta"] == 0.2
    assert (out / "adapter_model.safetensors").is_file() and not (out / "ref").exists()


def test_a_bf16_cast_adapter_is_restored_to_its_fp32_reference_values(engraved: Path):
    """What trl does to a QLoRA run's trainable adapter (bf16), undone from the reference
    copy, so DPO's small steps are not lost to bf16 rounding (CUDA-free stand-in)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from selfalign.train.dpo import keep_adapter_fp32

    base = AutoModelForCausalLM.from_pretrained(
        json.loads((engraved / "adapter_config.json").read_text())["base_model_name_or_path"]
    )
    model = PeftModel.from_pretrained(base, engraved, is_trainable=True)
    model.add_adapter("ref", model.peft_config["default"])
    params = dict(model.named_parameters())
    trained = [n for n, p in params.items() if p.requires_grad]
    for name in trained:  # as trl does: the reference copies the adapter, then bf16
        params[name.replace(".default.", ".ref.")].data.copy_(params[name].data)
        params[name].data = params[name].data.to(torch.bfloat16)
    assert keep_adapter_fp32(model) == len(trained) > 0
    params = dict(model.named_parameters())
    for name in trained:
        assert params[name].dtype == torch.float32
        assert torch.equal(params[name], params[name.replace(".default.", ".ref.")])


def test_a_partial_train_block_keeps_the_stage_schedule():
    from selfalign.stages.dpo import DPOStageConfig, continuing
    from selfalign.stages.verbose import VerboseConfig

    train = DPOStageConfig.model_validate({"train": {"epochs": 2}}).train
    assert (train.learning_rate, train.lr_scheduler, train.warmup_ratio) == (5e-5, "cosine", 0.1)
    assert train.epochs == 2 and train.global_batch_size == 64 and train.max_length == 1024
    fixed = DPOStageConfig.model_validate({"train": {"warmup_steps": 3}}).train
    assert fixed.warmup_ratio is None and fixed.warmup_steps == 3
    assert VerboseConfig.model_validate({"train": {"epochs": 2}}).train.max_length == 768
    # DPO continues a QLoRA adapter as QLoRA unless the config says otherwise
    assert continuing(train, "qlora").method == "qlora"
    assert continuing(train, "full").method == "lora"
    given = DPOStageConfig.model_validate({"train": {"method": "lora"}}).train
    assert continuing(given, "qlora").method == "lora"
