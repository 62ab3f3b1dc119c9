"""MoTE at 7-8B: the memory defaults, the 4-bit base option, the refusal of FSDP and
DeepSpeed ZeRO-3, and ``accelerate launch -m selfalign.mote.train_entry`` (two CPU
processes on the tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import load_file

from selfalign.errors import InputError
from selfalign.mote import is_mote_dir, load_mote, mote_state, train_mote
from selfalign.mote.config import MoteTrainConfig
from selfalign.mote.train import check_sharding
from selfalign.mote.train_entry import check_launch, main, sharded_launch
from selfalign.stages.training import LaunchConfig
from selfalign.tiny import PACKAGE_DIR
from test_mote import CHAINS
from test_train_sft import launch_two_processes

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = REPO / "configs" / "accelerate"
FAST = dict(learning_rate=1e-2, warmup=0, progress=False, device="cpu", step_skip_prob=0.5)


# ---------------------------------------------------------------- defaults


def test_defaults_checkpoint_and_accumulate_toward_the_global_batch() -> None:
    config = MoteTrainConfig()
    assert config.gradient_checkpointing and not config.quantize_base
    assert (config.batch_size, config.per_device(), config.accumulation_steps()) == (16, 2, 8)
    assert (config.per_device(4), config.accumulation_steps(4)) == (2, 2)
    # a small global batch is not padded up: per device never exceeds each process's share
    small = MoteTrainConfig(batch_size=2)
    assert (small.per_device(), small.accumulation_steps()) == (2, 1)
    assert MoteTrainConfig(batch_size=6).accumulation_steps() == 3
    assert MoteTrainConfig(batch_size=4).accumulation_steps(2) == 1
    explicit = MoteTrainConfig(batch_size=16, per_device_batch_size=4)
    assert explicit.accumulation_steps(2) == 2
    with pytest.raises(InputError, match="4 x 8"):
        explicit.accumulation_steps(8)
    with pytest.raises(ValidationError, match="not a multiple"):
        MoteTrainConfig(batch_size=16, per_device_batch_size=3)


@pytest.mark.parametrize(
    "path",
    [REPO / "configs" / "mote.yaml", *sorted((PACKAGE_DIR / "assets").glob("mote_demo*.yaml"))],
    ids=lambda p: p.name,
)
def test_shipped_mote_configs_still_batch(path: Path) -> None:
    """The shipped configs' train blocks under the new defaults: one process and two."""
    train = yaml.safe_load(path.read_text())["stages"]["mote"]["train"]
    config = MoteTrainConfig.model_validate(train)
    assert config.gradient_checkpointing
    for processes in (1, 2):
        per_step = config.per_device(processes) * processes
        assert per_step * config.accumulation_steps(processes) == config.batch_size


def test_default_checkpointing_trains_like_no_checkpointing(tiny_model: Path, tmp_path: Path):
    """Activation checkpointing (now the default) recomputes with the packed chains' 4D
    masks, step skipping and random question experts exactly as the forward saw them."""
    weights = []
    for checkpointing in (True, False):
        config = MoteTrainConfig(max_steps=2, batch_size=4, gradient_checkpointing=checkpointing,
                                 **FAST)  # fmt: skip
        out = tmp_path / str(checkpointing)
        result = train_mote(CHAINS, tiny_model, out, config)
        assert result.metrics["gradient_accumulation_steps"] == 2
        weights.append(load_file(out / "mote_adapter.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-4, atol=1e-5)
    assert any(
        not torch.equal(v, torch.zeros_like(v)) for k, v in weights[0].items() if "lora_B" in k
    )


# ---------------------------------------------------------------- 4-bit base


def test_quantized_base_on_cpu_is_one_input_error(tiny_model: Path, tmp_path: Path) -> None:
    config = MoteTrainConfig(quantize_base=True, max_steps=1, batch_size=2, **FAST)
    with pytest.raises(InputError, match="needs a CUDA GPU") as err:
        train_mote(CHAINS, tiny_model, tmp_path / "model", config)
    assert err.value.field == "quantize_base" and "\n" not in str(err.value)
    assert not (tmp_path / "model").exists()  # refused before anything loaded or was written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="4-bit NF4 needs a CUDA GPU")
def test_quantized_base_trains_float32_experts_and_saves_the_full_base(
    tiny_model: Path, tmp_path: Path
) -> None:
    pytest.importorskip("bitsandbytes")
    config = MoteTrainConfig(quantize_base=True, max_steps=2, batch_size=2, learning_rate=1e-2,
                             warmup=0, progress=False, device="cuda")  # fmt: skip
    result = train_mote(CHAINS, tiny_model, tmp_path / "model", config)
    assert result.metrics["quantized_base"] and result.metrics["steps"] == 2
    experts = load_file(tmp_path / "model" / "mote_adapter.safetensors")
    assert {v.dtype for k, v in experts.items() if "lora_" in k} == {torch.float32}
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert "quantization_config" not in saved  # a plain base: loads on CPU
    model, _ = load_mote(tmp_path / "model", dtype=torch.float32)
    assert mote_state(model).method == "mote"
    loaded = model.state_dict()
    for key, value in experts.items():
        torch.testing.assert_close(loaded[key].float(), value.float())


# ---------------------------------------------------------------- FSDP / ZeRO-3


def launch_env(config: Path) -> dict[str, str]:
    """The environment ``accelerate launch --config_file CONFIG`` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(config), "--num_processes", "2", "-m", "selfalign.mote.train_entry"]
    )
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before its launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize(("name", "what"), [("fsdp", "FSDP"), ("deepspeed_zero3", "ZeRO-3")])
def test_fsdp_and_zero3_are_refused_before_the_model_loads(
    name: str, what: str, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ACCELERATE / f"{name}.yaml"
    env = launch_env(config)
    with pytest.raises(InputError, match=what):
        check_sharding(env)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    with pytest.raises(InputError, match=f"{what}.*configs/accelerate/ddp.yaml"):
        train_mote(CHAINS, tiny_model, tmp_path / "model", MoteTrainConfig(**FAST))
    assert not (tmp_path / "model").exists()
    # the stage reads the same from the file, before launching anything
    assert what in sharded_launch(config)
    with pytest.raises(InputError, match=what) as err:
        check_launch(LaunchConfig(num_processes=2, accelerate_config=config))
    assert err.value.field == "launch.accelerate_config"


def test_ddp_is_not_refused() -> None:
    env = launch_env(ACCELERATE / "ddp.yaml")
    check_sharding(env)
    assert sharded_launch(ACCELERATE / "ddp.yaml") is None
    check_launch(LaunchConfig(num_processes=2, accelerate_config=ACCELERATE / "ddp.yaml"))


# ---------------------------------------------------------------- accelerate launch


def test_two_process_accelerate_launch_trains_and_writes_a_mote_model(
    tiny_model: Path, tmp_path: Path
) -> None:
    chains = tmp_path / "chains.jsonl"
    chains.write_text("".join(json.dumps(c) + "\n" for c in CHAINS), encoding="utf-8")
    config = tmp_path / "train.yaml"
    config.write_text(
        "max_steps: 2\nbatch_size: 4\nlearning_rate: 1.0e-2\nwarmup: 0\nprogress: false\n"
        "logging_steps: 1\n",
        encoding="utf-8",
    )
    out = tmp_path / "model"
    proc = launch_two_processes(
        "selfalign.mote.train_entry", "--chains", str(chains), "--base", str(tiny_model),
        "--out", str(out), "--config", str(config),
    )  # fmt: skip
    summaries = [line for line in proc.stdout.splitlines() if line.startswith('{"model_dir"')]
    assert len(summaries) == 1  # the main process reports, once
    assert json.loads(summaries[0])["model_dir"] == str(out)
    metrics = json.loads((out / "train_metrics.json").read_text())
    # 2 processes x 2 per device = the global batch of 4: no accumulation
    assert (metrics["processes"], metrics["per_device_batch_size"]) == (2, 2)
    assert (metrics["gradient_accumulation_steps"], metrics["steps"]) == (1, 2)
    assert metrics["examples"] == len(CHAINS)
    assert is_mote_dir(out) and not (out / "checkpoints").exists()
    model, _ = load_mote(out)
    assert mote_state(model).method == "mote"
    trained = load_file(out / "mote_adapter.safetensors")
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in trained.items() if "lora_B" in k)


def test_entry_point_bad_input_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.jsonl"
    code = main(["--chains", str(missing), "--base", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "nope.jsonl" in err and "\n" not in err
