"""Run-directory storage: stable ids, atomic files, append-only JSONL logs.

A JSONL log is append-only; a line counts as committed once it ends with a newline. A
write killed mid-line leaves a torn tail: readers ignore it, and the next writer to open
the log cuts it off, so a resumed run never sees half a record and never loses a
committed one. Only writers (the runner, the eval commands' record files) change files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selfalign.errors import InputError


def stable_hash(obj: Any, length: int = 16) -> str:
    data = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()[:length]


def record_id(*parts: Any) -> str:
    """A record's id: the hash of the inputs it was made from."""
    return stable_hash(list(parts))


def file_sha256(path: Path) -> str:
    """A file's content hash; for a folder, the hash of its files' names and contents."""
    path = Path(path)
    if not path.is_dir():
        digest = hashlib.sha256()
        with path.open("rb") as f:  # in blocks: model files are large
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\0".encode())
    return digest.hexdigest()


@contextmanager
def folder_in_place(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` (which must be absent or empty) to write into; it
    becomes ``out`` by one rename when the block ends, and is removed if the block fails:
    a reader never sees half an export."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty (the caller checked)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, fsync, rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """A run directory's ``manifest.json`` (only read: looking at a run never writes)."""
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        raise InputError("not a run directory (no manifest.json)", file=run_dir)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON ({e.msg})", file=path) from None


def dumps_record(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def read_records(path: Path) -> list[dict[str, Any]]:
    """The committed records of a JSONL log: whole lines only. A torn last line (a writer
    mid-append, or killed) is ignored, not cut: a pure reader changes nothing and creates
    nothing, so looking at a live run never loses what its writer commits."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    data = data[: data.rfind(b"\n") + 1]
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


class JsonlWriter:
    """The one writer of an append-only JSONL log: opening it creates its folder and cuts
    a torn last line left by a killed writer; each ``append`` commits a whole batch."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()

    def _repair(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        return read_records(self.path)

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """One write + fsync for the whole batch: the batch is the unit of commit."""
        text = "".join(dumps_record(r) + "\n" for r in records)
        if not text:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def read_jsonl_numbered(
    path: Path, *, required: tuple[str, ...] = ()
) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each record of a user-supplied JSONL file; bad input
    (missing, not UTF-8, bad JSON, not an object, a required field missing, no records)
    raises InputError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", file=path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise InputError("not valid UTF-8", file=path, line=line) from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"invalid JSON ({e.msg})", file=path, line=n) from None
        if not isinstance(row, dict):
            raise InputError("expected a JSON object", file=path, line=n)
        for key in required:
            if key not in row:
                raise InputError(f"missing field {key!r}", file=path, line=n)
        rows.append((n, row))
    if not rows:
        raise InputError("file is empty", file=path)
    return rows


def read_jsonl(path: Path, *, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The records of a user-supplied JSONL file (see ``read_jsonl_numbered``)."""
    return [row for _, row in read_jsonl_numbered(path, required=required)]
