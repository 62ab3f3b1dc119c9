"""Load and check the stage-2 principles and exemplars files.

A malformed file raises ``InputError`` naming the file, the line and the entry
(``exemplars#3.rules``), so the CLI exits 2 with one line a user can act on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, Field, ValidationError

from selfalign.annotations import DEFAULT_EXEMPLARS, DEFAULT_PRINCIPLES
from selfalign.chat_format import ASSISTANT_TAG, USER_TAG
from selfalign.errors import InputError
from selfalign.validation import StrictModel, describe_error, load_yaml

# Lines that would read as a speaker turn inside an exemplar and break parsing.
_TURN_LINE = re.compile(r"(?m)^\s*###\s*(User|Assistant)\b")


def _one_line(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    if "\n" in value:
        raise ValueError("must be a single line")
    return value


def _no_turn_markers(value: str) -> str:
    value = value.strip("\n")
    if not value.strip():
        raise ValueError("must not be empty")
    if _TURN_LINE.search(value):
        raise ValueError(f"must not contain a line starting with {USER_TAG} or {ASSISTANT_TAG}")
    return value


def _label(value: str) -> str:
    value = _one_line(value)
    if re.search(r"[()\d]", value):
        raise ValueError("must not contain digits or parentheses (they delimit citations)")
    return value


OneLine = Annotated[str, AfterValidator(_one_line)]
Label = Annotated[str, AfterValidator(_label)]
Prose = Annotated[str, AfterValidator(_no_turn_markers)]


class Principle(StrictModel):
    name: Label = Field(description="short label cited in the thoughts, e.g. 'candid'")
    text: OneLine = Field(description="the rule itself, one line")


class PrinciplesFile(StrictModel):
    header: Prose = Field(description="introduces the assistant; {name} and {cutoff} filled in")
    principles: list[Principle] = Field(min_length=1)


class Exemplar(StrictModel):
    covers: str | None = Field(None, description="what the exemplar shows; not shown to the model")
    user: Prose
    analysis: OneLine = Field(description="one sentence: what the user wants")
    rules: list[int] = Field(min_length=1, description="principle numbers that apply (1-based)")
    answer: Prose


class ExemplarsFile(StrictModel):
    self_description: OneLine = Field(description="the fixed first sentence of every thought")
    exemplars: list[Exemplar] = Field(min_length=1)


@dataclass(frozen=True)
class Annotations:
    """The principles and exemplars a stage-2 run uses, validated together."""

    principles_file: Path
    exemplars_file: Path
    header: str
    principles: list[Principle]
    self_description: str
    exemplars: list[Exemplar]

    @property
    def files(self) -> list[Path]:
        return [self.principles_file, self.exemplars_file]


def _line_of(path: Path, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the deepest YAML node along ``loc`` (best effort)."""
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None
    if node is None:
        return None
    line = node.start_mark.line + 1
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if k.value == key]
            if not match:
                break
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        line = node.start_mark.line + 1
    return line


def _entry_name(loc: tuple[Any, ...]) -> str:
    """('exemplars', 2, 'rules') -> 'exemplars#3.rules' (entries counted from 1)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"#{part + 1}"
        else:
            out += f".{part}" if out else str(part)
    return out


def validate_file(model: type[BaseModel], path: Path) -> Any:
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise InputError("expected a mapping at the top level", file=path)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        loc, msg = describe_error(e)
        raise InputError(
            msg, file=path, line=_line_of(path, loc), field=_entry_name(loc) or None
        ) from None


def load_principles(path: Path | None = None) -> PrinciplesFile:
    path = Path(path or DEFAULT_PRINCIPLES)
    parsed: PrinciplesFile = validate_file(PrinciplesFile, path)
    seen: dict[str, int] = {}
    for i, p in enumerate(parsed.principles):
        key = p.name.casefold()
        if key in seen:
            raise InputError(
                f"duplicate principle name {p.name!r} (also #{seen[key] + 1})",
                file=path, line=_line_of(path, ("principles", i, "name")),
                field=f"principles#{i + 1}.name",
            )  # fmt: skip
        seen[key] = i
    return parsed


def load_exemplars(path: Path | None = None, *, num_principles: int) -> ExemplarsFile:
    path = Path(path or DEFAULT_EXEMPLARS)
    parsed: ExemplarsFile = validate_file(ExemplarsFile, path)
    for i, ex in enumerate(parsed.exemplars):
        bad = [r for r in ex.rules if not 1 <= r <= num_principles]
        if bad:
            raise InputError(
                f"rule {bad[0]} does not exist (the principles file has {num_principles})",
                file=path, line=_line_of(path, ("exemplars", i, "rules")),
                field=f"exemplars#{i + 1}.rules",
            )  # fmt: skip
    return parsed


def load_annotations(principles: Path | None = None, exemplars: Path | None = None) -> Annotations:
    """Both files, checked against each other (exemplar rules must name real principles)."""
    p_path = Path(principles or DEFAULT_PRINCIPLES)
    e_path = Path(exemplars or DEFAULT_EXEMPLARS)
    p = load_principles(p_path)
    e = load_exemplars(e_path, num_principles=len(p.principles))
    return Annotations(
        principles_file=p_path,
        exemplars_file=e_path,
        header=p.header.strip("\n"),
        principles=p.principles,
        self_description=e.self_description,
        exemplars=e.exemplars,
    )
