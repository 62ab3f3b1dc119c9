"""Stage-2 prompt text: assembly of the shared in-context prefix and parsing of replies.

The prompt is one running conversation in our chat format::

    {header}

    1 (harmless): ...
    ...
    16 (practical): ...

    ### User:
    {exemplar question}

    ### Assistant (internal thoughts):
    {self-description} {analysis} I should follow rules 9 (offline), 7 (candid).

    ### Assistant:
    {exemplar answer}

    ... four more exemplars ...

    ### User:                       <- per-query part starts here
    {query}

    ### Assistant (internal thoughts):

Everything up to the query is the shared ``prefix`` of every request (byte-identical, so a
backend prefills it once); the model continues with thoughts, an answer turn, and the answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from selfalign.annotations.principles import Annotations
from selfalign.chat_format import ASSISTANT_TAG, NEXT_USER_TURN, TURN_SEP, USER_TAG, user_turn

THOUGHTS_TAG = "### Assistant (internal thoughts):"
RULES_LEAD = "I should follow rules"
STOP = (NEXT_USER_TURN, TURN_SEP + THOUGHTS_TAG)

# The answer turn opener, at the start of a line.
_ANSWER_TAG = re.compile(r"(?m)^[ \t]*" + re.escape(ASSISTANT_TAG) + r"[ \t]*\n?")
# Any speaker turn: where an answer ends if the model kept writing the conversation.
_TURNS = "|".join(re.escape(t) for t in (USER_TAG, ASSISTANT_TAG, THOUGHTS_TAG))
_ANY_TURN = re.compile(rf"(?m)^[ \t]*(?:{_TURNS})")
# The rule citation a real base model writes: "I should follow rules 9 (offline), 7 (candid)
# and 3 (useful).", "rule 3 (helpful)", "rules 3, 7 and 11", names that are not the rule's own;
# whatever follows the list is ignored.
_LEAD = re.compile(r"\bI should follow (?:the )?rules?\b\s*:?\s*", re.I)
_CITED = re.compile(r"(\d+)(?:\s*\(([^()]*)\))?")
_SEP = r"\s*(?:[,;&]\s*(?:and\s+)?|and\s+)"
_CITED_LIST = re.compile(rf"{_CITED.pattern}(?:{_SEP}{_CITED.pattern})*")


def fill(text: str, name: str, cutoff: str) -> str:
    """Put the assistant's name and knowledge cutoff into human-written text."""
    return text.replace("{name}", name).replace("{cutoff}", cutoff)


def citation(numbers: list[int], annotations: Annotations) -> str:
    """``[9, 7]`` -> ``'9 (offline), 7 (candid)'``."""
    return ", ".join(f"{n} ({annotations.principles[n - 1].name})" for n in numbers)


def render_thoughts(self_description: str, analysis: str, rules: str) -> str:
    return f"{self_description} {analysis} {RULES_LEAD} {rules}."


@dataclass(frozen=True)
class StagePrompt:
    """The filled-in annotations for one run: the shared prefix and per-query prompts."""

    annotations: Annotations
    name: str  # the generation-time assistant name
    cutoff: str

    def fill(self, text: str) -> str:
        return fill(text, self.name, self.cutoff)

    @property
    def self_description(self) -> str:
        return self.fill(self.annotations.self_description)

    def exemplar_turns(self) -> list[tuple[str, str, str]]:
        """(user, thoughts, answer) of every exemplar, as the model sees them."""
        return [
            (
                self.fill(ex.user),
                render_thoughts(
                    self.self_description,
                    self.fill(ex.analysis),
                    citation(ex.rules, self.annotations),
                ),
                self.fill(ex.answer),
            )
            for ex in self.annotations.exemplars
        ]

    def prefix(self) -> str:
        a = self.annotations
        rules = "\n".join(
            f"{i} ({p.name}): {self.fill(p.text)}" for i, p in enumerate(a.principles, 1)
        )
        turns = [
            part
            for user, thoughts, answer in self.exemplar_turns()
            for part in (
                user_turn(user),
                f"{THOUGHTS_TAG}\n{thoughts}",
                f"{ASSISTANT_TAG}\n{answer}",
            )
        ]
        return TURN_SEP.join([self.fill(a.header) + "\n" + rules, *turns]) + TURN_SEP

    @staticmethod
    def query_prompt(query: str) -> str:
        """The per-query part that follows the prefix: the user turn and the thoughts tag."""
        return f"{user_turn(query)}{TURN_SEP}{THOUGHTS_TAG}\n"


def cut_at_turn(text: str) -> tuple[str, bool]:
    """Text before the first speaker turn marker, and whether one was found."""
    m = _ANY_TURN.search(text)
    return (text[: m.start()], True) if m else (text, False)


@dataclass(frozen=True)
class Split:
    """A generation divided into its thoughts and its answer (None: not there)."""

    thoughts: str
    answer: str | None
    answer_cut: bool = False  # the answer ran into a next turn and was cut there


def split_generation(text: str) -> Split:
    """Thoughts are what precedes the answer turn; the answer ends at the next turn."""
    m = _ANSWER_TAG.search(text)
    if m is None:
        thoughts, _ = cut_at_turn(text)
        return Split(thoughts.strip(), None)
    answer, cut = cut_at_turn(text[m.end() :])
    return Split(text[: m.start()].strip(), answer.strip(), cut)


@dataclass(frozen=True)
class Thoughts:
    analysis: str
    principles: list[int]  # the cited numbers that name a principle, in order, no repeats
    misnamed: list[int] = field(default_factory=list)  # cited with a name not their own
    text: str = ""  # the thoughts after the self-description, as written


def _norm(text: str) -> str:
    return " ".join(text.split())


def starts_with_self_description(thoughts: str, self_description: str) -> bool:
    return _norm(thoughts).casefold().startswith(_norm(self_description).casefold())


def _citation(text: str) -> tuple[int, re.Match[str]] | None:
    """Where the first rule citation starts and its number list."""
    for lead in _LEAD.finditer(text):
        cited = _CITED_LIST.match(text, lead.end())
        if cited:
            return lead.start(), cited
    return None


def parse_thoughts(
    thoughts: str, self_description: str, annotations: Annotations
) -> Thoughts | None:
    """The expected form or None: the self-description, an analysis, then "I should follow
    rules" and at least one rule number. The numbers are what counts: a name that is not
    the rule's own is noted in ``misnamed`` (small base models often get it wrong), numbers
    out of range are left out; text after the list is ignored."""
    text = _norm(thoughts)
    if not starts_with_self_description(text, self_description):
        return None
    rest = text[len(_norm(self_description)) :].strip()
    found = _citation(rest)
    if found is None:
        return None
    at, cited = found
    analysis = rest[:at].strip()
    names = [p.name.casefold() for p in annotations.principles]
    numbers: list[int] = []
    misnamed: list[int] = []
    for number, name in _CITED.findall(cited.group()):
        n = int(number)
        if not 1 <= n <= len(names):
            continue
        if name.strip() and name.strip().casefold() != names[n - 1] and n not in misnamed:
            misnamed.append(n)
        if n not in numbers:
            numbers.append(n)
    if not analysis or not numbers:
        return None
    return Thoughts(analysis, numbers, misnamed, rest)
