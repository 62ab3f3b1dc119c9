"""Fixed chunk boundaries over a list of item ids: the one place resumable work is cut."""

from __future__ import annotations

from collections.abc import Container, Iterator, Sequence
from typing import TypeVar

K = TypeVar("K")


def pending_chunks(ids: Sequence[K], done: Container[K], size: int) -> Iterator[list[K]]:
    """The ids not yet ``done``, in chunks cut every ``size`` ids of the *whole* list.

    Cutting after filtering would shift every boundary after a resume; cutting the whole
    list keeps them, so a resumed run sends the backend the same batches (same padding,
    same per-chunk seeds) as an uninterrupted one. Chunks with nothing left are skipped.
    """
    for start in range(0, len(ids), size):
        todo = [i for i in ids[start : start + size] if i not in done]
        if todo:
            yield todo
