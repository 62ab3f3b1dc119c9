"""The exceptions users read: bad input (exit code 2) and a stage that cannot go on (exit 1);
one line each, no traceback."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input: a config, data file, model path or argument the user must fix.

    The message is one line and names where the problem is: ``FILE:LINE: FIELD: what``.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.file, self.line, self.field, self.detail = file, line, field, message
        where = []
        if file is not None:
            where.append(f"{file}:{line}" if line is not None else str(file))
        if field:
            where.append(field)
        text = ": ".join([*where, message])
        super().__init__(" ".join(text.split()))  # always a single line


class StageError(Exception):
    """A stage cannot go on for a reason the user should read, not debug: an upstream stage
    kept nothing to train on, say. One line, exit code 1, no traceback; the stage is marked
    failed and the run resumes once the cause is fixed."""
