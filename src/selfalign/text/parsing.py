"""Parse a base model's continuation of a numbered task list, and judge each item.

The self-instruct prompt shows tasks as

    3. Instruction: <text>
       Input: <text>            (only when the task has an input; may span several
                                 lines, blank lines included)
    ###

and ends with ``"N. Instruction:"`` so the model writes task N, N+1, ... An item starts at
its ``N. Instruction:`` line and ends at the first separator line (``###`` alone on a line)
or at the next item's start, so a blank line inside an input does not end it. The last
item must be closed by a separator: generation stops at the token limit, at the end of
text or at the start of item ``max_list_number + 1``, and an item not closed by then may
be cut anywhere, so it is never kept (the reference implementation discards it too).

A model that learned Alpaca-style lists may add an ``Output:`` after the input (or right
after the instruction); that answer is not part of the task and is cut off. Each parsed
item gets a verdict: ``None`` (passes) or the reason it is dropped. The near-duplicate
check needs the whole pool, so the stage applies it afterwards (reason ``near_duplicate``).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

# Things a text-only model cannot do or see (METHOD.md's list, with plurals).
DEFAULT_BLACKLIST: tuple[str, ...] = (
    "image", "images", "picture", "pictures", "photo", "photos", "graph", "graphs",
    "file", "files", "map", "maps", "draw", "plot", "go to", "video", "videos",
    "audio", "music", "flowchart", "diagram", "diagrams",
)  # fmt: skip

SEPARATOR = "###"  # the line that closes every task of the list

_ITEM_RE = re.compile(r"^[ \t]*(\d+)[ \t]*\.[ \t]*Instruction[ \t]*:", re.M)
_INPUT_RE = re.compile(r"^[ \t]*(?:(\d+)[ \t]*\.[ \t]*)?Input[ \t]*:", re.M)
_OUTPUT_RE = re.compile(r"^[ \t]*(?:(\d+)[ \t]*\.[ \t]*)?Output[ \t]*:", re.M)
_SEPARATOR_RE = re.compile(rf"^[ \t]*{re.escape(SEPARATOR)}[ \t]*$", re.M)


@dataclass(frozen=True)
class ItemFilter:
    """Per-item filters (word counts are whitespace words, as in Self-Instruct)."""

    min_words: int = 4
    max_words: int = 150
    blacklist: Sequence[str] = DEFAULT_BLACKLIST

    @cached_property
    def _blacklist_re(self) -> re.Pattern[str]:
        words = [r"\s+".join(map(re.escape, w.split())) for w in self.blacklist if w.strip()]
        return re.compile(rf"\b(?:{'|'.join(words)})\b" if words else r"(?!x)x", re.I)

    def verdict(self, instruction: str, input_text: str = "") -> str | None:
        """Why the task is dropped, or None. Checked in this order; lengths and start are
        the instruction's, the blacklist covers the input too (a task whose material is
        "the attached file" is as undoable as one that asks for it)."""
        n_words = len(instruction.split())
        if n_words < self.min_words:
            return "too_short"
        if n_words > self.max_words:
            return "too_long"
        first = instruction[0]
        if first in string.punctuation or not first.isascii():
            return "bad_start"
        if self._blacklist_re.search(instruction) or self._blacklist_re.search(input_text):
            return "blacklisted_word"
        return None


@dataclass
class ParsedItem:
    number: int
    instruction: str
    input: str
    raw: str  # the item's text as the model wrote it
    verdict: str | None = None


def format_task(number: int, instruction: str, input_text: str) -> str:
    """One task of the numbered list, closed by the separator line; the input line only
    when there is an input."""
    line = f"{number}. Instruction: {instruction.strip()}\n"
    if input_text.strip():
        line += f"   Input: {input_text.strip()}\n"
    return f"{line}{SEPARATOR}\n"


def list_prompt(header: str, tasks: Sequence[tuple[str, str]]) -> tuple[str, int]:
    """The prompt (header, numbered tasks, open next item) and the next item's number."""
    body = "".join(format_task(i, ins, inp) for i, (ins, inp) in enumerate(tasks, 1))
    nxt = len(tasks) + 1
    return f"{header}{body}{nxt}. Instruction:", nxt


def _split_item(body: str, number: int) -> tuple[str, str, bool]:
    """(instruction, input, well formed) of one item's text after ``Instruction:``.

    An ``Output:`` line and all after it is the model answering its own task: cut off.
    Not well formed: an empty instruction or one running past its line, more than one
    ``Input:`` line, an ``Input:`` after the ``Output:``, or a line numbered for another item.
    """
    output = _OUTPUT_RE.search(body)
    task = body[: output.start()] if output else body
    inputs = list(_INPUT_RE.finditer(task))
    head = task[: inputs[0].start()] if inputs else task
    instruction, _, extra = head.strip().partition("\n")
    input_text = task[inputs[0].end() :].strip() if len(inputs) == 1 else ""
    labels = [*inputs, *([output] if output else [])]
    wrong_number = any(m.group(1) is not None and int(m.group(1)) != number for m in labels)
    late_input = output is not None and _INPUT_RE.search(body, output.end()) is not None
    ok = bool(instruction.strip()) and not extra.strip() and len(inputs) <= 1
    return instruction.strip(), input_text, ok and not wrong_number and not late_input


def parse_continuation(
    continuation: str, first_number: int, *, truncated: bool, item_filter: ItemFilter
) -> list[ParsedItem]:
    """Split a continuation of ``list_prompt`` into items and give each a verdict.

    ``truncated``: generation stopped at the token limit (it names the reason the last,
    unclosed item is dropped). Verdicts, first that applies: ``bad_numbering`` (number out
    of sequence; the sequence resyncs on it), ``truncated`` / ``incomplete`` (the last item
    has no separator line after it: cut by the token limit / by a stop or the end of text),
    ``malformed`` (see ``_split_item``), then ``ItemFilter.verdict``. Text between a
    separator and the next ``N. Instruction:`` line belongs to no item and is ignored.
    """
    text = f"{first_number}. Instruction:{continuation}"
    starts = list(_ITEM_RE.finditer(text))
    items: list[ParsedItem] = []
    expected = first_number
    for k, m in enumerate(starts):
        limit = starts[k + 1].start() if k + 1 < len(starts) else len(text)
        closing = _SEPARATOR_RE.search(text, m.end(), limit)
        end = closing.start() if closing else limit
        number = int(m.group(1))
        instruction, input_text, ok = _split_item(text[m.end() : end], number)
        item = ParsedItem(number, instruction, input_text, text[m.start() : end].strip())
        if number != expected:
            item.verdict = "bad_numbering"
        elif closing is None and k == len(starts) - 1:
            item.verdict = "truncated" if truncated else "incomplete"
        elif not ok:
            item.verdict = "malformed"
        else:
            item.verdict = item_filter.verdict(instruction, input_text)
        expected = number + 1
        items.append(item)
    return items
