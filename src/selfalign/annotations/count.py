"""``selfalign annotations``: how many human-written lines the method depends on.

SELF-ALIGN's claim is that it needs under 300 lines of human text in all. What counts:
- a JSONL file (seed tasks, red-team types with their seeds): one line per entry;
- a principles YAML: the header's lines, plus one line per principle;
- an exemplars YAML: the self-description, and per exemplar the non-empty lines of the
  user turn and the answer plus one line each for the analysis and the rule list;
- any other ``.yaml``/``.yml``/``.txt`` file: its non-empty, non-comment lines.
Comments in the files are notes for people, not text the model sees: they do not count.

``PATH`` may be a folder of annotation files (default: the shipped ones), a run directory
(the files its configured stages read), a run config YAML (the same, before running), or
one annotation file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from selfalign.annotations import ANNOTATIONS_DIR
from selfalign.annotations.principles import (
    ExemplarsFile,
    PrinciplesFile,
    load_principles,
    validate_file,
)
from selfalign.errors import InputError
from selfalign.validation import load_yaml, validate_model

BUDGET = 300  # the paper's total: "fewer than 300 lines of human annotations"
SUFFIXES = {".jsonl", ".yaml", ".yml", ".txt"}


@dataclass(frozen=True)
class FileCount:
    path: Path
    kind: str  # jsonl | principles | exemplars | text
    items: int  # entries, principles, exemplars, or lines
    lines: int  # human-written lines


def _lines(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.strip())


def count_file(path: Path) -> FileCount:
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", file=path)
    if path.suffix == ".jsonl":
        n = _lines(path.read_text(encoding="utf-8"))
        return FileCount(path, "jsonl", n, n)
    if path.suffix in (".yaml", ".yml"):
        data = load_yaml(path)
        if isinstance(data, dict) and "principles" in data:
            p: PrinciplesFile = load_principles(path)
            return FileCount(
                path, "principles", len(p.principles), _lines(p.header) + len(p.principles)
            )
        if isinstance(data, dict) and "exemplars" in data:
            e: ExemplarsFile = validate_file(ExemplarsFile, path)
            per = [_lines(x.user) + 2 + _lines(x.answer) for x in e.exemplars]
            return FileCount(path, "exemplars", len(e.exemplars), 1 + sum(per))
    text = path.read_text(encoding="utf-8")
    n = sum(1 for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    return FileCount(path, "text", n, n)


def annotation_paths(path: Path | None = None) -> list[Path]:
    """The annotation files ``path`` stands for (see the module docstring)."""
    path = Path(path) if path is not None else ANNOTATIONS_DIR
    if path.is_file():
        data = load_yaml(path) if path.suffix in (".yaml", ".yml") else None
        is_run_config = isinstance(data, dict) and "model" in data
        return _run_files(path) if is_run_config else [path]
    if not path.is_dir():
        raise InputError("no such file or directory", file=path)
    if (path / "config.yaml").is_file() and (path / "manifest.json").is_file():
        return _run_files(path / "config.yaml")
    files = [
        p
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts
    ]
    if not files:
        raise InputError("no annotation files (.jsonl, .yaml, .txt) here", file=path)
    return files


def _run_files(config_path: Path) -> list[Path]:
    """The files the configured stages read, through each stage's ``annotation_files``.
    Only the ``stages`` block is read: the model need not be on this machine."""
    from selfalign.registry import STAGE_MODULES, load_stage

    config_path = config_path.resolve()
    data = load_yaml(config_path)
    files: list[Path] = []
    for name, settings in ((data or {}).get("stages") or {}).items():
        if name not in STAGE_MODULES:
            raise InputError("unknown stage", file=config_path, field=f"stages.{name}")
        stage = load_stage(name)
        cfg = validate_model(
            stage.config_cls, settings or {}, file=config_path, prefix=f"stages.{name}"
        )
        hook = stage.annotation_files
        for f in hook(cfg) if hook else []:
            if Path(f) not in files:
                files.append(Path(f))
    return files


def count_annotations(path: Path | None = None) -> list[FileCount]:
    return [count_file(p) for p in annotation_paths(path)]


def format_counts(counts: list[FileCount], budget: int = BUDGET) -> str:
    """A per-file table, the total, and whether it fits the budget."""
    total = sum(c.lines for c in counts)
    root = Path(os.path.commonpath([c.path.parent for c in counts])) if counts else Path()
    names = [str(c.path.relative_to(root)) for c in counts]
    width = max([len(n) for n in names] + [len("total")])
    out = [
        f"human-written lines in {root}",
        f"{'file':<{width}}  {'kind':<10} {'items':>5} {'lines':>5}",
    ]
    for name, c in zip(names, counts, strict=True):
        out.append(f"{name:<{width}}  {c.kind:<10} {c.items:>5} {c.lines:>5}")
    out.append(f"{'total':<{width}}  {'':<10} {'':>5} {total:>5}")
    if total < budget:
        out.append(f"budget {budget}: OK ({budget - total} lines to spare)")
    else:
        out.append(f"budget {budget}: over ({total} lines; the method must stay under {budget})")
    return "\n".join(out)
