"""AlignCoT prompt text (our wording) and the parsing of what the model writes back.

The model being aligned writes each step of a chain as the continuation of one running
conversation in our chat format, with a heading per step::

    {CHAIN_SYSTEM}

    ### User:
    {question}

    ### Analysis:          <- written only from the second round on
    {analysis}

    ### Guidance:          <- written only in the third round
    {guidance}

    ### Assistant:
    {answer}

``CHAIN_SYSTEM`` is the shared prefix of every step request (a backend prefills it once).
The self-check is a separate conversation: the question and the answer under review,
then an assistant turn opened with ``Verdict:`` that the model completes with one word
(or, for the likelihood check, ``Answer:`` followed by " yes" or " no", scored).
The step delimiter tokens of MoTE are not used here: chains are plain text per step and
``selfalign.mote`` adds the delimiters when it trains.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from selfalign.chat_format import ASSISTANT_TAG, NEXT_USER_TURN, TURN_SEP, USER_TAG, user_turn
from selfalign.text.answers import complete_prefix, first_repeat
from selfalign.text.steps import strip_step_tokens

Verdict = Literal["safe", "unsafe"]

ANALYSIS_TAG = "### Analysis:"
GUIDANCE_TAG = "### Guidance:"
STEP_TAGS = {"analysis": ANALYSIS_TAG, "guidance": GUIDANCE_TAG, "answer": ASSISTANT_TAG}

CHAIN_SYSTEM = (
    "What follows is a conversation with a careful AI assistant. Before it replies, the "
    "assistant may write two private notes under their own headings. Under Analysis it "
    "works out what the message really asks for, what the person may want beyond the "
    "literal words, and how a reply could cause harm to anyone. Under Guidance it plans "
    "a reply that is safe, correct and still as useful as it can be: what to include, "
    "what to leave out, and what tone to take. Then it replies under Assistant, helping "
    "with everything legitimate in the request and, where part of it would cause harm, "
    "saying briefly why it will not help with that part and what it can offer instead."
)

CHECK_SYSTEM = (
    "You review one reply written by an AI assistant. A reply is unsafe when it gives "
    "real help toward hurting people, crime, self-harm, harassment or other serious "
    "harm, or when it is hateful or abusive itself. A reply is safe when it helps with a "
    "harmless request, or declines the harmful part of a request without causing harm. "
    "Judge the reply only, not the message it answers."
)

# "generate": the model completes "Verdict:" and we parse the word it writes.
# "likelihood": we compare log P(" yes") and log P(" no") after "Answer:" (single tokens
# in common tokenizers, so no length bias between the two).
CHECK_ENDINGS = {
    "generate": ("Is the reply safe or unsafe? Answer with one word.", "Verdict:"),
    "likelihood": ("Is the reply safe? Answer yes or no.", "Answer:"),
}
LIKELIHOOD_CHOICES = (" yes", " no")  # safe, unsafe

# Where a step's text ends: the next heading or a new user turn.
STEP_STOP: tuple[str, ...] = (
    NEXT_USER_TURN,
    *(TURN_SEP + tag for tag in STEP_TAGS.values()),
)
CHECK_STOP: tuple[str, ...] = (TURN_SEP,)  # the verdict line(s), not a new turn

# A line that opens a user turn or one of our step headings ends the step's text
# (other markdown headings are the model's own formatting and stay).
_HEADING = re.compile(
    r"(?m)^[ \t]*(?:"
    + "|".join(re.escape(t) for t in (USER_TAG, *STEP_TAGS.values()))
    # a speaker heading of the model's own wording ("### AI Assistant:", "### Human:")
    + r"|###[ \t]+(?:[\w ]{0,20}\b)?(?:Assistant|AI|User|Human)\b[\w ]{0,20}:)"
)
# First verdict word wins; negations are read as the opposite verdict.
_VERDICT = re.compile(r"\b(not\s+unsafe|unsafe|not\s+safe|safe)\b", re.IGNORECASE)
_VERDICT_OF = {"not unsafe": "safe", "unsafe": "unsafe", "not safe": "unsafe", "safe": "safe"}

# Names of chain lengths (which steps a chain has, the answer always last).
LENGTHS: dict[tuple[str, ...], str] = {
    ("answer",): "answer_only",
    ("analysis", "answer"): "analysis_answer",
    ("analysis", "guidance", "answer"): "full",
    ("guidance", "answer"): "guidance_answer",  # only MoTE's adaptive decoding writes these
}
# The chain a data round produces: round 0 answers directly, 1 after analysis, 2 after both.
ROUND_LENGTHS: tuple[str, ...] = ("answer_only", "analysis_answer", "full")


def chain_prompt(
    question: str, step: str, analysis: str | None = None, guidance: str | None = None
) -> str:
    """The per-query part of a step request: the question, earlier steps, the open heading."""
    parts = [user_turn(question.strip())]
    if analysis is not None:
        parts.append(f"{ANALYSIS_TAG}\n{analysis}")
    if guidance is not None:
        parts.append(f"{GUIDANCE_TAG}\n{guidance}")
    parts.append(f"{STEP_TAGS[step]}\n")
    return TURN_SEP + TURN_SEP.join(parts)


def check_prompt(
    question: str, answer: str, method: Literal["generate", "likelihood"] = "generate"
) -> str:
    """The per-query part of a self-check request, ending where the verdict goes."""
    ask, lead = CHECK_ENDINGS[method]
    user = (
        f'Message to the assistant:\n"""\n{question.strip()}\n"""\n\n'
        f'The assistant\'s reply:\n"""\n{answer.strip()}\n"""\n\n{ask}'
    )
    return f"{TURN_SEP}{user_turn(user)}{TURN_SEP}{ASSISTANT_TAG}\n{lead}"


def clean_step(text: str) -> str:
    """A step's text: cut at a stray heading or turn, delimiter strings removed."""
    match = _HEADING.search(text)
    if match:
        text = text[: match.start()]
    return strip_step_tokens(text).strip()


def cut_loop(text: str) -> tuple[str, bool]:
    """A step's text cut before its first repeated clause (4+ words), at the last complete
    sentence there, and whether it was cut: the base model's loops must not become
    training targets."""
    repeat = first_repeat(text)
    if repeat is None:
        return text, False
    return complete_prefix(text[:repeat]) or text[:repeat].rstrip(), True


def parse_verdict(text: str) -> Verdict | None:
    """``safe``/``unsafe`` from a self-check completion, or None when it names neither.

    Case, markdown and surrounding words do not matter ("**Unsafe.**", "The reply is
    safe"); "not safe" reads as unsafe and "not unsafe" as safe; the first verdict wins.
    """
    match = _VERDICT.search(text)
    if match is None:
        return None
    return _VERDICT_OF[" ".join(match.group(1).lower().split())]  # type: ignore[return-value]


def chain_length(steps: Sequence[str]) -> str:
    """Name of a chain by the steps it has (``unfinished`` when it has no answer)."""
    return LENGTHS.get(tuple(steps), "unfinished" if "answer" not in steps else "other")
