"""Run configs: YAML (safe-loaded) validated by pydantic v2.

Unknown keys are rejected everywhere; relative paths resolve against the config file's
folder (``ConfigPath`` fields and local model specs). Every validation problem becomes
one ``InputError`` line naming the file and the dotted field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo

from selfalign.backends.config import BackendConfig
from selfalign.backends.spec import resolve_local_spec
from selfalign.errors import InputError


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    value = value.expanduser()
    if base is not None and not value.is_absolute():
        value = (Path(base) / value).resolve()
    return value


def _must_exist(value: Path) -> Path:
    if not value.exists():
        raise ValueError(f"file not found: {value}")
    return value


ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]
ExistingPath = Annotated[Path, AfterValidator(_resolve_path), AfterValidator(_must_exist)]


def resolve_spec(spec: str, info: ValidationInfo) -> str:
    """Make local model paths absolute so the stored config works from anywhere."""
    base = (info.context or {}).get("base_dir")
    return resolve_local_spec(spec, Path(base) if base else None)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


DEFAULT_ASSISTANT_NAME = "Sable"


class StageConfig(StrictModel):
    """Base for every stage's settings. ``backend`` overrides the run's backend block."""

    # The field the run-level ``assistant_name`` fills (set there only, never per stage).
    RUN_NAME_FIELD: ClassVar[str | None] = None

    backend: BackendConfig | None = None


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
    stages: dict[str, dict[str, Any] | None] = Field(default_factory=dict)

    def generation_backend(self) -> BackendConfig:
        return self.backend or BackendConfig(model=self.model)


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-"))


def validate_model(model_cls: type[BaseModel], data: Any, *, file: Path, prefix: str = "") -> Any:
    """``model_cls.model_validate`` with errors turned into one InputError line."""
    try:
        return model_cls.model_validate(data, context={"base_dir": file.parent})
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(p for p in (prefix, _field_path(err["loc"])) if p)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        raise InputError(msg, file=file, field=field or None) from None
    except InputError as e:  # raised by a validator (e.g. a bad model spec)
        raise InputError(e.detail, file=file, field=prefix or e.field) from None


def load_yaml(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", file=path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError("not valid UTF-8", file=path) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise InputError(f"invalid YAML: {problem}", file=path, line=line) from None


def load_run_config(path: Path) -> tuple[RunConfig, dict[str, StageConfig]]:
    """The run config and each configured stage's validated settings."""
    from selfalign.pipeline import registered_stages

    path = Path(path).resolve()
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise InputError("expected a mapping at the top level", file=path)
    run = validate_model(RunConfig, data, file=path)
    stages = registered_stages()
    stage_configs: dict[str, StageConfig] = {}
    for name, settings in run.stages.items():
        if name not in stages:
            known = ", ".join(stages)
            raise InputError(f"unknown stage (known: {known})", file=path, field=f"stages.{name}")
        cls, settings = stages[name].config_cls, dict(settings or {})
        if cls.RUN_NAME_FIELD is not None:
            given = settings.get(cls.RUN_NAME_FIELD, run.assistant_name)
            if given != run.assistant_name:  # (a resolved config.yaml repeats the run's name)
                raise InputError(
                    "the assistant's name is set once, as the top-level assistant_name",
                    file=path, field=f"stages.{name}.{cls.RUN_NAME_FIELD}",
                )  # fmt: skip
            settings[cls.RUN_NAME_FIELD] = run.assistant_name
        stage_configs[name] = validate_model(cls, settings, file=path, prefix=f"stages.{name}")
    return run, stage_configs
