"""What a finished training leaves behind: the training log and, if asked, merged weights."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TRAIN_LOG = "train_log.json"
MERGED_SUBDIR = "merged"


def write_json_atomic(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def merge_adapter(adapter_dir: Path, merged_dir: Path, *, dtype: torch.dtype) -> Path:
    """Fold a LoRA adapter into its base weights: a plain model dir, no peft needed to load it.

    The base is reloaded unquantised (from the path recorded in ``adapter_config.json``), so
    a QLoRA adapter merges into bf16 weights, not into lossy 4-bit ones.
    """
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, dtype=dtype)
    merged = model.merge_and_unload()
    tmp = merged_dir.with_name(f".{merged_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(tmp)
    shutil.rmtree(merged_dir, ignore_errors=True)
    tmp.rename(merged_dir)
    return merged_dir


def loss_history(log_history: list[dict]) -> list[dict]:
    """The per-step entries of ``Trainer.state.log_history`` (loss, lr, grad norm, ...)."""
    return [
        {k: v for k, v in entry.items() if isinstance(v, int | float)}
        for entry in log_history
        if "loss" in entry
    ]
