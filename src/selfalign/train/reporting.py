"""Training logs through transformers' reporting integrations (TensorBoard, W&B, MLflow,
Trackio, ...): the names a config may give, the package each needs, and the arguments and
callbacks a ``Trainer`` gets from them.

Importable without torch or transformers (run configs validate ``report_to`` with it);
``trainer_reporting`` imports transformers when called. TensorBoard writes its event files
to ``logging_dir``, by default ``OUT/logs`` inside the model folder being built, so the
logs move with the folder when the runner renames it into place. The other services keep
their own settings in the environment (``WANDB_*``, ``MLFLOW_TRACKING_URI``, ...).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, get_args

from pydantic import BeforeValidator

from selfalign.errors import InputError

if TYPE_CHECKING:
    from transformers import TrainerCallback

LOGS_SUBDIR = "logs"

ReportTarget = Literal[
    "azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive", "flyte", "kubeflow",
    "mlflow", "neptune", "swanlab", "tensorboard", "trackio", "wandb", "none",
]  # fmt: skip
# transformers' ``INTEGRATION_TO_CALLBACK`` names (a test keeps the two lists equal).
REPORT_TARGETS = tuple(t for t in get_args(ReportTarget) if t != "none")
# The ``report_to`` setting of both training configs: one name or a list.
ReportTo = Annotated[
    list[ReportTarget], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)
]

# integration -> (modules, any of which will do, per group that must all be present; pip name)
_NEEDS: dict[str, tuple[tuple[tuple[str, ...], ...], str]] = {
    "azure_ml": ((("azureml.core",),), "azureml-core"),
    "clearml": ((("clearml",),), "clearml"),
    "codecarbon": ((("codecarbon",),), "codecarbon"),
    "comet_ml": ((("comet_ml",),), "comet_ml"),
    "dagshub": ((("dagshub",), ("mlflow",)), "dagshub mlflow"),
    "dvclive": ((("dvclive",),), "dvclive"),
    "flyte": ((("flytekit",), ("flytekitplugins.deck",)), "flytekit flytekitplugins-deck-standard"),
    "mlflow": ((("mlflow",),), "mlflow"),
    "neptune": ((("neptune",),), "neptune"),
    "swanlab": ((("swanlab",),), "swanlab"),
    "tensorboard": ((("tensorboard", "tensorboardX"),), "tensorboard"),
    "trackio": ((("trackio",),), "trackio"),
    "wandb": ((("wandb",),), "wandb"),
}  # kubeflow needs no package: it reports to the Kubeflow trainer server it runs under


def report_targets(report_to: Sequence[str]) -> list[str]:
    """The integrations asked for: ``[]`` and ``["none"]`` both mean none."""
    return [name for name in report_to if name != "none"]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def check_reporting(report_to: Sequence[str], *, field: str = "report_to") -> None:
    """A missing package is bad input, found before any model is loaded."""
    for name in report_targets(report_to):
        groups, pip = _NEEDS.get(name, ((), ""))
        if not all(any(_installed(m) for m in group) for group in groups):
            raise InputError(
                f"report_to {name!r} needs {pip} installed (pip install {pip})", field=field
            )


def logs_dir(out_dir: Path, logging_dir: Path | None) -> Path:
    return Path(logging_dir) if logging_dir is not None else Path(out_dir) / LOGS_SUBDIR


def trainer_report_to(report_to: Sequence[str]) -> list[str]:
    """``TrainingArguments.report_to``: the integrations but TensorBoard, which comes as
    a callback (``report_callbacks``); checks their packages first."""
    check_reporting(report_to)
    return [name for name in report_targets(report_to) if name != "tensorboard"]


def report_callbacks(
    report_to: Sequence[str], out_dir: Path, logging_dir: Path | None
) -> list[TrainerCallback]:
    """TensorBoard's callback writing to ``logs_dir``: left to transformers it writes under
    the checkpoint folder (removed after training) or wherever ``$TENSORBOARD_LOGGING_DIR``
    says."""
    if "tensorboard" not in report_to:
        return []
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = str(logs_dir(out_dir, logging_dir))  # read at on_train_begin
    return [callback]
