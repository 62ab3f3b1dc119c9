"""Reading YAML and validating it with pydantic, every problem one ``InputError`` line.

A leaf module (stdlib, yaml, pydantic and ``selfalign.errors`` only), so any loader can
use it without pulling in the pipeline. ``ConfigPath`` fields resolve relative paths
against the config file's folder, passed as the validation context ``base_dir``; without
that context (models built from CLI options) paths stay as given, ``~`` expanded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, ValidationInfo

from selfalign.errors import InputError

Loc = tuple[str | int, ...]


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


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


def describe_error(error: ValidationError) -> tuple[Loc, str]:
    """The first problem as (where, what), in the user's terms: the location without
    pydantic's validator steps, "unknown key" for an extra key, no "Value error, " prefix
    (and never the errors.pydantic.dev URL that ``str(error)`` carries)."""
    err = error.errors()[0]
    loc = tuple(p for p in err["loc"] if not str(p).startswith("function-"))
    if err["type"] == "extra_forbidden":
        return loc, "unknown key"
    return loc, err["msg"].removeprefix("Value error, ")


def field_path(loc: Loc) -> str:
    """('stages', 'aligned', 'backend', 'dtype') -> 'stages.aligned.backend.dtype'."""
    return ".".join(str(p) for p in loc)


def validate_model(model_cls: type[BaseModel], data: Any, *, file: Path, prefix: str = "") -> Any:
    """``model_cls.model_validate`` with ``ConfigPath``s resolved against ``file``'s folder
    and errors turned into one InputError line."""
    try:
        return model_cls.model_validate(data, context={"base_dir": file.parent})
    except ValidationError as e:
        loc, msg = describe_error(e)
        field = ".".join(p for p in (prefix, field_path(loc)) if p)
        raise InputError(msg, file=file, field=field or None) from None
    except InputError as e:  # raised by a validator (e.g. a bad model spec)
        raise InputError(e.detail, file=file, field=prefix or e.field) from None


def load_yaml(path: Path) -> Any:
    """A YAML file, safe-loaded; a missing, non-UTF-8 or malformed file is an InputError."""
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
