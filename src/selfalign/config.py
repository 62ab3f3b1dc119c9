"""Run configs: YAML (safe-loaded) validated by pydantic v2.

Unknown keys are rejected everywhere; relative paths resolve against the config file's
folder (``ConfigPath`` fields and local model specs). Every validation problem becomes
one ``InputError`` line naming the file and the dotted field (``selfalign.validation``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, Field, ValidationInfo

from selfalign.backends.config import BackendConfig
from selfalign.backends.spec import resolve_local_spec
from selfalign.errors import InputError
from selfalign.registry import STAGE_MODULES, load_stage
from selfalign.validation import ConfigPath, ExistingPath, StrictModel, load_yaml, validate_model


def resolve_spec(spec: str, info: ValidationInfo) -> str:
    """Make local model paths absolute so the stored config works from anywhere."""
    base = (info.context or {}).get("base_dir")
    return resolve_local_spec(spec, Path(base) if base else None)


DEFAULT_ASSISTANT_NAME = "Sable"


class StageConfig(StrictModel):
    """Base for every stage's settings. ``backend`` overrides the run's backend block."""

    # The field the run-level ``assistant_name`` fills (set there only, never per stage).
    RUN_NAME_FIELD: ClassVar[str | None] = None

    backend: BackendConfig | None = None

    def check_with(self, stages: dict[str, StageConfig]) -> tuple[str, str] | None:
        """(field, problem) where these settings contradict another stage's (``stages``:
        every configured stage), checked when the config loads; None when they agree."""
        return None


class Throughputs(StrictModel):
    """Measured speeds that only ``run --dry-run`` reads, to turn its training token
    estimates into hours (generation speeds are each backend's ``throughput_tokens_per_s``).
    An earlier run of the same stage in the run directory measured more closely, and wins."""

    gpu_check: ExistingPath | None = Field(
        None, description="scripts/gpu_check.sh's JSON: its 8B LoRA training tokens/s"
    )
    train_tokens_per_s: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="your own measured training speed, tokens/s over all devices "
        "(wins over gpu_check)",
    )  # fmt: skip


class RunConfig(StrictModel):
    name: str = "run"
    seed: int = 0
    assistant_name: str = Field(
        DEFAULT_ASSISTANT_NAME,
        min_length=1,
        description="the assistant's name in every system text and in the kept answers "
        "(stage 2 writes under `aligned.generation_name` and replaces it with this one)",
    )
    model: Annotated[str, AfterValidator(resolve_spec)] = Field(
        description="the base model being aligned (spec)"
    )
    backend: BackendConfig | None = Field(
        None, description="generation backend; defaults to the base model on hf"
    )
    out_dir: ConfigPath | None = None
    throughputs: Throughputs = Field(default_factory=Throughputs)
    stages: dict[str, dict[str, Any] | None] = Field(default_factory=dict)

    def generation_backend(self) -> BackendConfig:
        return self.backend or BackendConfig(model=self.model)


def load_run_config(path: Path) -> tuple[RunConfig, dict[str, StageConfig]]:
    """The run config and each configured stage's validated settings."""
    path = Path(path).resolve()
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise InputError("expected a mapping at the top level", file=path)
    run = validate_model(RunConfig, data, file=path)
    stage_configs: dict[str, StageConfig] = {}
    for name, settings in run.stages.items():
        if name not in STAGE_MODULES:
            known = ", ".join(STAGE_MODULES)
            raise InputError(f"unknown stage (known: {known})", file=path, field=f"stages.{name}")
        cls, settings = load_stage(name).config_cls, dict(settings or {})
        if cls.RUN_NAME_FIELD is not None:
            given = settings.get(cls.RUN_NAME_FIELD, run.assistant_name)
            if given != run.assistant_name:  # (a resolved config.yaml repeats the run's name)
                raise InputError(
                    "the assistant's name is set once, as the top-level assistant_name",
                    file=path, field=f"stages.{name}.{cls.RUN_NAME_FIELD}",
                )  # fmt: skip
            settings[cls.RUN_NAME_FIELD] = run.assistant_name
        stage_configs[name] = validate_model(cls, settings, file=path, prefix=f"stages.{name}")
    for name, config in stage_configs.items():
        if problem := config.check_with(stage_configs):
            raise InputError(problem[1], file=path, field=f"stages.{name}.{problem[0]}")
    return run, stage_configs
