"""What cards and exports read from a run directory, and which of its folders are what.

``load_run`` reads ``manifest.json`` and ``config.yaml`` and where the base model comes
from (``selfalign.model_origin``); ``model_folders`` finds the model folders of complete
stages from the artifacts the manifest records (plus a ``merged/`` subfolder, and the
adapter ``verbose/model`` was merged from); ``record_sets`` the stages with records.
Pure reads: nothing here writes, loads a model or imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfalign.errors import InputError
from selfalign.model_origin import ModelOrigin, model_origin
from selfalign.registry import load_stage, stage_names
from selfalign.stages.api import RECORDS
from selfalign.stages.evaluate import MODEL_STAGES
from selfalign.store import read_manifest
from selfalign.train.export import MERGED_SUBDIR
from selfalign.validation import load_yaml

# the eval stage's name for the model each training stage builds
EVAL_NAMES = {stage: model for model, stage in MODEL_STAGES.items()}  # stage -> eval name


@dataclass(frozen=True)
class RunView:
    """What a card reads from a run directory."""

    run_dir: Path
    manifest: dict[str, Any]
    config: dict[str, Any]
    base: ModelOrigin

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return self.manifest.get("stages", {})

    def complete(self, name: str) -> bool:
        return (self.stages.get(name) or {}).get("status") == "complete"

    def stage_config(self, name: str) -> dict[str, Any]:
        return (self.config.get("stages") or {}).get(name) or {}


@dataclass(frozen=True)
class ModelFolder:
    stage: str
    variant: str  # model (the stage's artifact), merged, adapter; or a mote row's method
    path: Path
    kind: str  # adapter (peft), full (transformers), mote (selfalign)
    row: bool = False  # a further model of the stage (Artifact.path): a mote ablation row

    @property
    def eval_name(self) -> str | None:
        name = EVAL_NAMES.get(self.stage)
        return f"{name}:{self.variant}" if self.row and name else name


def load_run(
    run_dir: Path, manifest: dict[str, Any] | None = None, base_hub_id: str | None = None
) -> RunView:
    run_dir = Path(run_dir)
    if manifest is None:
        manifest = read_manifest(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise InputError("not a run directory (no config.yaml)", file=run_dir)
    config = load_yaml(run_dir / "config.yaml") or {}
    if not isinstance(config, dict) or not config.get("model"):
        raise InputError("names no model", file=run_dir / "config.yaml", field="model")
    return RunView(run_dir, manifest, config, model_origin(str(config["model"]), base_hub_id))


def model_kind(path: Path) -> str | None:
    if (path / "mote_config.json").is_file():
        return "mote"
    if (path / "adapter_config.json").is_file():
        return "adapter"
    if (path / "config.json").is_file():
        return "full"
    return None


def model_folders(run: RunView) -> list[ModelFolder]:
    """The model folders of the run's complete stages (recorded in the manifest)."""
    found = []
    for name, entry in run.stages.items():
        if entry.get("status") != "complete" or not entry.get("artifact"):
            continue
        root = run.run_dir / entry["artifact"]
        for variant, path in (("model", root), ("merged", root / MERGED_SUBDIR),
                              ("adapter", run.run_dir / name / "adapter")):  # fmt: skip
            kind = model_kind(path) if path.is_dir() else None
            if kind and (variant == "model" or path != root):
                found.append(ModelFolder(name, variant, path, kind))
        for row in entry.get("artifacts", []):  # further models: the mote stage's rows
            path = run.run_dir / row
            if path.is_dir() and (kind := model_kind(path)):
                found.append(ModelFolder(name, Path(row).name, path, kind, row=True))
    return found


def record_sets(run: RunView) -> list[str]:
    """The complete stages with records (eval's are results, not data)."""
    return [
        n
        for n in run.stages
        if n != "eval" and run.complete(n) and (run.run_dir / n / RECORDS).is_file()
    ]


def lineage(run: RunView, name: str) -> list[str]:
    """``name`` and the stages it reads, at any depth, upstream first."""
    seen: set[str] = set()

    def visit(stage: str) -> None:
        if stage in seen or stage not in run.stages:
            return
        seen.add(stage)
        for dep in load_stage(stage).inputs if stage in stage_names() else ():
            visit(dep)

    visit(name)
    order = dict.fromkeys([*stage_names(), *run.stages])
    return [n for n in order if n in seen and n != "eval"]


def method_of(stages: list[str]) -> str:
    if any(s in ("chains", "mote") for s in stages):
        return "AlignCoT + MoTE"
    if "dpo" in stages:
        return "SELF-ALIGN + DPO on principle-driven preferences"
    return "SELF-ALIGN"


def chat_template(folder: Path) -> str | None:
    """The chat template saved with a model's tokenizer."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template")
    return template if isinstance(template, str) else None
