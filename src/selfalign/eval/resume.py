"""Resumable per-item work: records keyed by a stable id in an append-only JSONL file.

A rerun reads the file, skips every id already there and appends the rest batch by
batch, so killing a long judge run loses at most the batch in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from selfalign.backends.spec import parse_spec
from selfalign.chunking import pending_chunks
from selfalign.errors import InputError
from selfalign.progress import ProgressReporter
from selfalign.store import JsonlWriter

T = TypeVar("T")


def model_identity(spec: str) -> str:
    """What a record id keeps of a model spec: for a server, the served model's name (a
    new URL or port for the same judge keeps the records); otherwise the spec itself."""
    try:
        parsed = parse_spec(spec)
    except InputError:
        return spec
    return f"openai#{parsed.name}" if parsed.kind == "openai" else str(parsed)


def load_done(path: Path | None) -> tuple[JsonlWriter | None, dict[str, dict[str, Any]]]:
    if path is None:
        return None, {}
    if Path(path).is_dir():
        raise InputError("expected a JSONL file, got a directory", file=path)
    log = JsonlWriter(Path(path))
    try:
        rows = log.read()
    except ValueError:
        raise InputError(
            "not a JSONL file of records (delete it to start over)", file=path
        ) from None
    return log, {r["id"]: r for r in rows if isinstance(r, dict) and "id" in r}


def run_resumable(
    items: Sequence[tuple[str, T]],
    work: Callable[[list[T]], list[dict[str, Any] | None]],
    *,
    records: Path | None,
    label: str,
    batch_size: int = 16,
) -> tuple[dict[str, dict[str, Any]], int]:
    """(record by id for every finished item, number of items that failed this time).

    ``work`` returns one record per item, or None where the item failed (it is retried on
    the next run). Each record gets its item's ``id``.
    """
    log, done = load_done(records)
    by_id = dict(items)
    chunks = list(pending_chunks([i for i, _ in items], done, batch_size))
    failed = 0
    left = sum(map(len, chunks))
    with ProgressReporter(label, total=len(items), done=len(items) - left) as progress:
        for chunk in chunks:
            results = work([by_id[i] for i in chunk])
            fresh = []
            for i, rec in zip(chunk, results, strict=True):
                if rec is None:
                    failed += 1
                    continue
                rec = {"id": i, **rec}
                done[i] = rec
                fresh.append(rec)
            if log is not None:
                log.append(fresh)
            progress.advance(len(chunk))
    return done, failed
