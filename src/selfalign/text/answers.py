"""Checks on a generated answer, each a small pure function stages combine as they need:
refusal openers, copies of in-context prompt text (and which text they copy), repeated
clauses (found so the loop can be cut off), and truncation (with the complete part an
answer cut by the token limit still has)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

# What stage 2 drops by default: answers that open with an apology template (METHOD.md sec. 4;
# the reference drops "I'm sorry" / "I am sorry"). "Unfortunately, I ..." is not here: it
# mostly opens a candid statement of a limit ("Unfortunately, I have no live prices, but..."),
# which is what the candour and no-live-data principles ask for.
APOLOGY_OPENERS: tuple[str, ...] = (
    "Sorry",
    "I'm sorry",
    "I am sorry",
    "I apologize",
    "I apologise",
    "My apologies",
)
# Opt-in (``refusal_openers: broad``): also AI disclaimers and flat "I can't ..." openers.
# This drops many answers the method wants: three of the five reference exemplar answers
# open with such a disclaimer, as that is how candour and static knowledge are expressed.
BROAD_REFUSAL_OPENERS: tuple[str, ...] = (
    *APOLOGY_OPENERS,
    "Unfortunately, I",
    "As an AI language model",
    "As an AI",
    "I cannot help",
    "I can't help",
    "I cannot assist",
    "I can't assist",
    "I cannot provide",
    "I can't provide",
    "I won't",
    "I will not",
)
REFUSAL_OPENERS: dict[str, tuple[str, ...]] = {
    "apology": APOLOGY_OPENERS,
    "broad": BROAD_REFUSAL_OPENERS,
}

_WORD = re.compile(r"[a-z0-9]+")
_CODE_BLOCK = re.compile(r"```.*?(?:```|\Z)", re.S)
_FENCE = re.compile(r"(?m)^[ \t]*```")
_CLAUSE = re.compile(r"[^.!?;:,\n]+")
# Sentence end, optionally followed by closing quotes/brackets/emphasis; or a closed code block.
_COMPLETE_END = re.compile(r"""(?:[.!?…]["'”’)\]*_]*|```)\s*$""")
# Where a complete unit of text ends: a sentence, a code fence line, or a line that does not
# lead into the next one (ending in ",", ";" or ":"). A list number ("3.") or an abbreviation
# ("e.g.", "a.m.", "Dr.") does not end a sentence.
_NOT_ABBREVIATION = r"(?<!^\d)(?<!^\d\d)(?<!\b[A-Za-z]\.[A-Za-z])(?<!\b(?:Dr|Mr|Ms|St|vs))"
_UNIT_END = re.compile(
    rf"""(?m){_NOT_ABBREVIATION}[.!?…]["'”’)\]*_]*(?=\s|$)"""
    r"|^[ \t]*```[ \t]*$"
    r"|[^\s,;:](?=[ \t]*\n)"
)


def words(text: str) -> list[str]:
    """Lowercase alphanumeric words (punctuation and case do not matter)."""
    return _WORD.findall(text.casefold())


def starts_with_refusal(answer: str, openers: Iterable[str] = APOLOGY_OPENERS) -> bool:
    """Opens with one of ``openers`` as whole words ("Unfortunately, I" is not "..., It")."""
    head = answer.lstrip().replace("’", "'").casefold()
    for opener in openers:
        o = opener.strip().replace("’", "'").casefold()
        if o and head.startswith(o) and not head[len(o) : len(o) + 1].isalnum():
            return True
    return False


def is_truncated(answer: str, finish_reason: str) -> bool:
    """Stopped by the token limit in the middle of a sentence."""
    return finish_reason == "length" and not _COMPLETE_END.search(answer)


def complete_prefix(text: str) -> str:
    """``text`` up to the end of its last complete sentence, line or code block ("" if it
    has none): the part of an answer cut off by the token limit that can still be kept.
    An unclosed code block goes entirely; half a program is worse than none."""
    fences = list(_FENCE.finditer(text))
    if len(fences) % 2:
        text = text[: fences[-1].start()]
    ends = [m.end() for m in _UNIT_END.finditer(text)]
    return text[: ends[-1]].rstrip() if ends else ""


def first_repeat(answer: str, min_words: int = 4) -> int | None:
    """Where the first clause (of at least ``min_words`` words) seen before starts: a
    degenerate loop begins there. Code blocks are left out, where repeated lines are normal."""
    prose = _CODE_BLOCK.sub(lambda m: "\n" * len(m.group()), answer)  # keeps offsets
    seen: set[tuple[str, ...]] = set()
    for clause in _CLAUSE.finditer(prose):
        key = tuple(words(clause.group()))
        if len(key) < min_words:
            continue
        if key in seen:
            return clause.start()
        seen.add(key)
    return None


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


# An echo: the answer holds at least this share of a text's word 4-grams, and at least
# ECHO_MIN of them (a short text is not "repeated" by one phrase).
ECHO_N, ECHO_SHARE, ECHO_MIN = 4, 0.5, 6


def echoes(answer: str, text: str, query: str = "") -> bool:
    """``answer`` repeats most of ``text`` (word 4-grams the query has are left out), even
    with a few words changed: a base model that writes its thoughts again as the answer."""
    grams = ngrams(words(text), ECHO_N) - ngrams(words(query), ECHO_N)
    shared = len(grams & ngrams(words(answer), ECHO_N))
    return shared >= ECHO_MIN and shared >= ECHO_SHARE * len(grams)


class LeakDetector:
    """Finds answers that copy a run of ``n`` words from a text of the in-context prompt
    (exemplars, principles...), unless the query has that run itself, and names the text
    copied most. ``n`` = 0 turns it off."""

    def __init__(self, sources: Mapping[str, str], n: int = 8) -> None:
        self.n = n
        self._grams = {name: ngrams(words(text), n) for name, text in sources.items()}

    def source(self, answer: str, query: str = "") -> str | None:
        """The source sharing the most runs with the answer, or None."""
        if self.n <= 0:
            return None
        runs = ngrams(words(answer), self.n) - ngrams(words(query), self.n)
        hits = {name: len(runs & grams) for name, grams in self._grams.items()}
        best = max(hits, key=hits.__getitem__, default=None)
        return best if best is not None and hits[best] else None
