"""Prompts from the user's own data (stage 1, ``stages.prompts.file``): a file or a saved
dataset used as the prompt pool, beside or instead of Self-Instruct and TGRT.

The data is read with the ``datasets`` library and never leaves this machine:
``load_dataset("json" | "parquet" | "csv", data_files=PATH)`` for a ``.jsonl``, ``.json``
(a list of objects, or JSON lines), ``.parquet`` or ``.csv`` file, ``load_from_disk`` for a
folder written by ``save_to_disk`` (of a ``DatasetDict``: its ``train`` split, or its only
one). The arrow copy ``load_dataset`` makes goes to a temporary folder deleted after the
read: the user's file is the only copy, and its hash is in the stage's fingerprint.

Rows are taken in file order, or in an order drawn from the run seed (``shuffle``), until
``limit`` prompts are kept; the rows after that are not looked at. Kept record:
``{"id", "instruction", "input", "source": "user_file", "row", "parents": []}``, ``row``
being the 0-based row index in the data (``dataset[row]``). A kept id is the hash of the
instruction and input, so the same prompt keeps its id whatever the order or the limit.
Drops (``dropped.jsonl``, id from the row): ``empty`` (the instruction is missing, blank
or not a string), ``bad_input`` (an input that is a list or an object), ``duplicate`` (the
same instruction and input as a kept row, named in ``duplicate_of``). Every row is decided
from the data and the run seed alone, so a rerun decides the same and the runner, which
skips ids already written, writes nothing new.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from selfalign.errors import InputError
from selfalign.stages.api import Batch, Estimate, MapWork, StageContext
from selfalign.store import read_jsonl_numbered, record_id, stable_hash
from selfalign.validation import ConfigPath, StrictModel

SOURCE = "user_file"
FIELD = "stages.prompts.file"  # where the settings live, for error messages
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
CHUNK = 10_000  # decisions per commit (nothing is generated: this only paces progress)
_KINDS = "a .jsonl, .json, .parquet or .csv file, or a folder written by save_to_disk"


class FileSourceConfig(StrictModel):
    """Off by default; giving a ``path`` turns it on unless ``enabled: false`` is set."""

    enabled: bool = False
    path: ConfigPath | None = Field(None, description=_KINDS)
    instruction_field: str = Field("instruction", min_length=1, description="the column to ask")
    input_field: str | None = Field(
        None, min_length=1, description="a column whose text follows the instruction (optional)"
    )
    shuffle: bool = Field(False, description="take rows in an order drawn from the run seed")
    limit: int | None = Field(None, ge=1, description="stop once this many prompts are kept")

    @model_validator(mode="before")
    @classmethod
    def _on_with_a_path(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("path") is not None and "enabled" not in data:
            return {**data, "enabled": True}
        return data

    @model_validator(mode="after")
    def _path_when_on(self) -> FileSourceConfig:
        if self.enabled and self.path is None:
            raise ValueError("path is required when the file source is enabled")
        return self


Decision = tuple[dict[str, Any], str | None]  # (record, drop reason or None: kept)


@dataclass(frozen=True)
class Row:
    """One row's values: the instruction and input as the data holds them."""

    row: int
    instruction: Any
    input: Any


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars or log lines from ``datasets`` while reading: a bad file must
    give our one error line on stderr, nothing before it."""
    import datasets

    bars_off = datasets.are_progress_bars_disabled()
    logger = logging.getLogger("datasets")
    level = logger.level
    datasets.disable_progress_bars()
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
        if not bars_off:
            datasets.enable_progress_bars()


def _from_disk(path: Path) -> Any:
    import datasets

    data = datasets.load_from_disk(str(path), keep_in_memory=True)
    if isinstance(data, datasets.DatasetDict):
        if "train" in data or len(data) == 1:
            return data["train"] if "train" in data else next(iter(data.values()))
        raise InputError(f"a dataset with splits {', '.join(data)} and none named train", file=path)
    return data


def _from_file(path: Path) -> Any:
    import datasets

    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise InputError(f"expected {_KINDS}", file=path)
    with tempfile.TemporaryDirectory(prefix="selfalign-data-") as cache:
        return datasets.load_dataset(
            builder, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True
        )


def load_table(path: Path) -> Any:
    """The ``datasets.Dataset`` at ``path``; any problem is an InputError naming the file."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", file=path)
    if path.is_dir() and not any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
        raise InputError(f"expected {_KINDS}", file=path)
    try:
        with _quiet_datasets():
            table = _from_disk(path) if path.is_dir() else _from_file(path)
    except InputError:
        raise
    except Exception as e:  # datasets and pyarrow raise many types for a bad file
        if path.suffix.lower() == ".jsonl":
            read_jsonl_numbered(path)  # names the line when the file is bad JSON
        raise InputError(f"cannot read it with datasets ({type(e).__name__})", file=path) from None
    if len(table) == 0:
        raise InputError("no rows", file=path)
    return table


def read_rows(cfg: FileSourceConfig) -> list[Row]:
    """Every row of the data, with the configured fields; a field missing from the data
    is an InputError naming the file and the setting."""
    path = Path(cfg.path)  # type: ignore[arg-type]
    table = load_table(path)
    wanted = {"instruction_field": cfg.instruction_field, "input_field": cfg.input_field}
    for setting, name in wanted.items():
        if name is not None and name not in table.column_names:
            have = ", ".join(table.column_names)
            raise InputError(
                f"no field {name!r} in the data (its fields: {have})",
                file=path, field=f"{FIELD}.{setting}",
            )  # fmt: skip
    columns = table.select_columns([n for n in wanted.values() if n is not None]).to_dict()
    instructions = columns[cfg.instruction_field]
    inputs = columns[cfg.input_field] if cfg.input_field else [None] * len(instructions)
    return [Row(i, ins, inp) for i, (ins, inp) in enumerate(zip(instructions, inputs, strict=True))]


def row_order(n: int, seed: int, shuffle: bool) -> list[int]:
    """Row indices in file order, or sorted by a hash of (run seed, row): the same order
    on every machine and Python version."""
    if not shuffle:
        return list(range(n))
    return sorted(range(n), key=lambda i: stable_hash([seed, SOURCE, "order", i]))


def _input_text(value: Any) -> str | None:
    """The input as text: None -> "", numbers as written; a list or object -> None."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int | float):
        return str(value)
    return None


def _as_json(value: Any) -> Any:
    """A value as a dropped record keeps it: JSON scalars as they are, the rest as text."""
    return value if isinstance(value, str | int | float | bool | None) else str(value)


def decide(rows: list[Row], cfg: FileSourceConfig, seed: int) -> list[Decision]:
    """(record, None) for each prompt kept and (record, reason) for each drop, in the order
    the rows are taken."""
    out: list[Decision] = []
    kept: set[str] = set()  # ids of kept prompts (an exact repeat has the same id)
    for i in row_order(len(rows), seed, cfg.shuffle):
        if cfg.limit is not None and len(kept) >= cfg.limit:
            break
        row = rows[i]
        base = {"source": SOURCE, "row": row.row, "parents": []}
        raw_input = "" if row.input is None else _as_json(row.input)
        drop = {"id": record_id(SOURCE, "row", row.row), "instruction": _as_json(row.instruction),
                "input": raw_input, **base}  # fmt: skip
        instruction = row.instruction.strip() if isinstance(row.instruction, str) else ""
        input_text = _input_text(row.input)
        if not instruction:
            out.append((drop, "empty"))
            continue
        if input_text is None:
            out.append((drop, "bad_input"))
            continue
        rid = record_id(SOURCE, instruction, input_text)
        if rid in kept:
            out.append(({**drop, "duplicate_of": rid}, "duplicate"))
            continue
        kept.add(rid)
        out.append(({"id": rid, "instruction": instruction, "input": input_text, **base}, None))
    return out


def as_batch(decisions: list[Decision]) -> Batch:
    return Batch(
        keep=[r for r, why in decisions if why is None],
        drop=[(r, why) for r, why in decisions if why is not None],
    )


def select(rows: list[Row], cfg: FileSourceConfig, seed: int) -> Batch:
    """The kept prompts and the drops (see ``decide``)."""
    return as_batch(decide(rows, cfg, seed))


def data_files(cfg: FileSourceConfig) -> list[Path]:
    """The data the source reads, read now so that a bad file or field fails at plan time
    (also under ``--dry-run``)."""
    if not cfg.enabled:
        return []
    read_rows(cfg)
    return [Path(cfg.path)]  # type: ignore[arg-type]


def run_user_file(ctx: StageContext, cfg: FileSourceConfig) -> Iterator[MapWork]:
    """Every row is decided up front (a repeat is one only in the order the rows are
    taken); the runner commits the decisions in chunks, skipping ids already written."""
    decisions = decide(read_rows(cfg), cfg, ctx.seed)
    batch = as_batch(decisions)
    ctx.log(f"user file: kept {len(batch.keep)}, dropped {len(batch.drop)} ({cfg.path})")
    items = {record["id"]: (record, why) for record, why in decisions}
    yield MapWork(items, CHUNK, lambda chunk: as_batch([item for _, item in chunk]))


def estimate_user_file(cfg: FileSourceConfig, seed: int) -> Estimate:
    """No requests; ``outputs``: the prompts the data gives (exact, from the same reading)."""
    batch = select(read_rows(cfg), cfg, seed)
    rows = len(batch.keep) + len(batch.drop)
    kept = len(batch.keep)
    note = f"user file: {kept} prompt{'s' * (kept != 1)} from {rows} row{'s' * (rows != 1)}"
    return Estimate(outputs=kept, note=note)
