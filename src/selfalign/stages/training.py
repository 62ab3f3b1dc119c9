"""Training inside a stage: in process, or as ``accelerate launch`` for several devices.

The runner stays one process either way (it owns the manifest); for multi-GPU training
the stage hands the examples to ``python -m selfalign.train`` under ``accelerate launch``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import Field

from selfalign.backends.config import BackendConfig
from selfalign.backends.spec import parse_spec
from selfalign.errors import InputError
from selfalign.stages.api import train_token_bound
from selfalign.store import atomic_write_text, dumps_record
from selfalign.train.config import DPOSettings, TrainConfig
from selfalign.train.export import MERGED_SUBDIR, TRAIN_LOG
from selfalign.validation import ConfigPath, StrictModel

if TYPE_CHECKING:
    from selfalign.stages.api import StageContext

PLAIN_SYSTEM_TEXT = (
    "You are {name}, an AI assistant. You are helpful, honest and careful: you answer "
    "what you know, say what you do not, and decline what would cause harm."
)


class LaunchConfig(StrictModel):
    """How training runs: in this process (default) or under ``accelerate launch``."""

    num_processes: int = Field(1, ge=1)
    accelerate_config: ConfigPath | None = Field(
        None, description="e.g. configs/accelerate/fsdp.yaml (relative to the run config)"
    )


def sft_train_tokens(examples: int, train: TrainConfig, sequences: int = 1) -> int:
    """``train_token_bound`` for a ``TrainConfig`` (one process: ``launch`` does not change
    the global batch)."""
    batch = (
        train.global_batch_size or train.per_device_batch_size * train.gradient_accumulation_steps
    )
    return train_token_bound(examples, epochs=train.epochs, max_steps=train.max_steps,
                             batch=batch, max_length=train.max_length, sequences=sequences)  # fmt: skip


def base_model_dir(spec: str) -> Path:
    """Training needs the base model's weights on disk."""
    parsed = parse_spec(spec)
    if parsed.path is None:
        raise InputError("training needs a local model directory, not a server", field="model")
    return parsed.path


def train_log(model_dir: Path) -> dict[str, Any]:
    """What training wrote beside the model (``train_log.json``)."""
    return json.loads((model_dir / TRAIN_LOG).read_text(encoding="utf-8"))


def trained_system_text(model_dir: Path) -> str | None:
    """The system text a model was trained with, as its training wrote it down
    (``train_log.json``; a MoTE model's config); a ``merged/`` folder's log is its
    parent's. None when nothing says."""
    from selfalign.mote.config import CONFIG_FILE as MOTE_CONFIG

    folders = [model_dir, model_dir.parent] if model_dir.name == MERGED_SUBDIR else [model_dir]
    for folder in folders:
        for file, key in ((TRAIN_LOG, "system_text"), (MOTE_CONFIG, "system")):
            path = folder / file
            if path.is_file():
                value = json.loads(path.read_text(encoding="utf-8")).get(key)
                if isinstance(value, str) and value:
                    return value
    return None


def trained_backend(base: BackendConfig, model_dir: Path) -> BackendConfig:
    """How to generate with a model a training stage built: its merged weights, else the
    base model with its LoRA adapter, else (full fine-tuning) the folder's own weights.

    Merged weights (``merge: true``) are the trained model: for QLoRA the adapter folded
    into the dequantised NF4 base it was trained on (``train_log.json``'s ``merge`` says how,
    and how close). Without them the backend loads the base unquantised, in its own dtype
    (hf: bf16 on a GPU, fp32 on CPU; vLLM: the model's), and applies the adapter on top,
    unmerged: for a QLoRA adapter that base is the original weights, not the 4-bit ones it
    was trained against, so generation differs from training by the quantisation error."""
    # the engine stays the run's where it can load a folder (vllm), else in process (hf)
    kind = "vllm" if parse_spec(base.model).kind == "vllm" else "hf"
    if (model_dir / MERGED_SUBDIR).is_dir():
        return base.model_copy(update={"model": f"{kind}:{model_dir / MERGED_SUBDIR}"})
    adapter_config = model_dir / "adapter_config.json"
    if adapter_config.is_file():
        update = {"adapter": str(model_dir)}
        # an adapter trained on another model than the run's (DPO on a fully fine-tuned
        # engraved model) goes on that model
        trained_on = json.loads(adapter_config.read_text(encoding="utf-8")).get(
            "base_model_name_or_path"
        )
        if (
            trained_on
            and Path(trained_on).is_dir()
            and parse_spec(base.model).path != Path(trained_on).resolve()
        ):
            update["model"] = f"{kind}:{trained_on}"
        return base.model_copy(update=update)
    return base.model_copy(update={"model": f"{kind}:{model_dir}"})


def stage_model_backend(
    ctx: StageContext, stage: str, served: BackendConfig | None, field: str
) -> BackendConfig:
    """How a stage generates with the model an upstream training ``stage`` built: ``served``
    when the config gives a backend for it (a server of that model), else the run's backend
    with that model (``trained_backend``). A server of the base model cannot load the
    trained weights: that is an input error naming ``field``, the setting to give."""
    if served is not None:
        return served
    run_backend = ctx.run.generation_backend()
    if run_backend.model.startswith("openai:"):
        raise InputError(
            f"an openai backend cannot load the {stage} model; serve it and set {field}",
            field=field,
        )
    return trained_backend(run_backend, ctx.artifact(stage))


def training_summary(model_dir: Path) -> dict[str, Any]:
    """The manifest's view of ``model_dir/train_log.json`` (loss history left out)."""
    log = train_log(model_dir)
    keep = ("method", "global_step", "examples", "dropped", "truncated", "global_batch",
            "optimizer_steps", "warmup_steps", "final_loss", "runtime_s", "resumed_from",
            "processes", "warnings", "template_check", "train_tokens", "merge", "objective",
            "initial_loss")  # fmt: skip
    return {k: log[k] for k in keep if k in log}


def train_model(
    examples: list[dict[str, Any]],
    base: Path,
    out_dir: Path,
    config: TrainConfig,
    system_text: str,
    launch: LaunchConfig,
    dpo: DPOSettings | None = None,
) -> None:
    """Train into ``out_dir``; resumes from its checkpoints after a kill. ``dpo``: the
    examples are preference pairs and ``base`` is the model DPO continues (``train.dpo``)."""
    if launch.num_processes == 1 and launch.accelerate_config is None:
        if dpo is not None:
            from selfalign.train.dpo import train_dpo

            train_dpo(examples, base, out_dir, config, dpo, system_text=system_text)
            return
        from selfalign.train.sft import train_sft

        train_sft(examples, base, out_dir, config, system_text=system_text)
        return
    work = out_dir / "launch"
    work.mkdir(parents=True, exist_ok=True)
    examples_file = work / "examples.jsonl"
    atomic_write_text(examples_file, "".join(dumps_record(e) + "\n" for e in examples))
    atomic_write_text(work / "train.yaml", yaml.safe_dump(config.model_dump(mode="json")))
    atomic_write_text(work / "system.txt", system_text)
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--num_processes", str(launch.num_processes)]  # fmt: skip
    if launch.accelerate_config is not None:
        cmd += ["--config_file", str(launch.accelerate_config)]
    cmd += ["-m", "selfalign.train", "--examples", str(examples_file), "--base", str(base),
            "--out", str(out_dir), "--config", str(work / "train.yaml"),
            "--system-file", str(work / "system.txt")]  # fmt: skip
    if dpo is not None:
        atomic_write_text(work / "dpo.yaml", yaml.safe_dump(dpo.model_dump(mode="json")))
        cmd += ["--dpo", str(work / "dpo.yaml")]
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"accelerate launch exited with {proc.returncode}")
