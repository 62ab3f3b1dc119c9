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

``{question}`` is one text. A query with earlier turns (an HH-RLHF dialogue) is written
as ``dialogue_question`` renders it: the earlier turns as a "User: ..." / "Assistant: ..."
transcript, then the last user message, exactly as ``selfalign.mote.chat`` renders a
chat history for a MoTE model, so that the chains train the format chat decodes.

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
from selfalign.text.answers import complete_prefix, first_repeat, ngrams, words
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

# "generate": the model completes "Verdict:" and ``parse_verdict`` reads its first sentence.
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

# How a question with earlier turns reads (the same words as ``selfalign.mote.chat``).
EARLIER_LEAD = "Earlier in this conversation:"
NEW_MESSAGE_LEAD = "The user's new message:"
SPEAKER_NAMES = {"user": "User", "assistant": "Assistant"}

# A line that opens a user turn or one of our step headings ends the step's text
# (other markdown headings are the model's own formatting and stay).
_HEADING = re.compile(
    r"(?m)^[ \t]*(?:"
    + "|".join(re.escape(t) for t in (USER_TAG, *STEP_TAGS.values()))
    # a speaker heading of the model's own wording ("### AI Assistant:", "### Human:")
    + r"|###[ \t]+(?:[\w ]{0,20}\b)?(?:Assistant|AI|User|Human)\b[\w ]{0,20}:"
    # a step heading of the model's own wording: Gemma 3 270M followed its analysis with
    # "### Advice:" and put "### Answer:" inside its answer (a bare word and a colon:
    # "### Step 1: Rinse" is formatting and stays)
    + r"|###[ \t]+(?:Analysis|Guidance|Advice|Plan|Answer|Response|Reply)[ \t]*:"
    + r"|###[ \t]*$"  # a heading cut off before its name (seen at the end of an answer)
    # a new user turn in the words of a multi-turn question (``dialogue_question``): Gemma
    # 3 270M, given one, went on with "The user's new message:" or "User: ..." lines
    + r"|(?:User|Human):|"
    + "|".join(re.escape(t) for t in (EARLIER_LEAD, NEW_MESSAGE_LEAD))
    + ")"
)

# Names of chain lengths (which steps a chain has, the answer always last).
LENGTHS: dict[tuple[str, ...], str] = {
    ("answer",): "answer_only",
    ("analysis", "answer"): "analysis_answer",
    ("analysis", "guidance", "answer"): "full",
    ("guidance", "answer"): "guidance_answer",  # only MoTE's adaptive decoding writes these
}
# The chain a data round produces: round 0 answers directly, 1 after analysis, 2 after both.
ROUND_LENGTHS: tuple[str, ...] = ("answer_only", "analysis_answer", "full")


def dialogue_question(turns: Sequence[tuple[str, str]]) -> str:
    """One question text from (role, text) turns, role "user" or "assistant", the last
    the user's: a single turn is its text unchanged; earlier turns come first as a
    transcript, then the new message (``selfalign.mote.chat`` asks a MoTE model this way)."""
    if not turns or turns[-1][0] != "user":
        raise ValueError("the last turn must be the user's")
    if len(turns) == 1:
        return turns[0][1]
    transcript = TURN_SEP.join(f"{SPEAKER_NAMES[role]}: {text}" for role, text in turns[:-1])
    return f"{EARLIER_LEAD}{TURN_SEP}{transcript}{TURN_SEP}{NEW_MESSAGE_LEAD}\n{turns[-1][1]}"


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


COPY_WORDS = 8  # words in a row that make a step a copy of the chain prompt's instructions
_WORD_SPAN = re.compile(r"[a-z0-9]+", re.IGNORECASE)  # ``words`` with their offsets


def cut_copy(text: str, source: str, question: str = "") -> tuple[str, bool]:
    """A step's text cut before the first run of ``COPY_WORDS`` words it copies from
    ``source`` (the prompt's instructions; runs the question has too are left out), at the
    last complete sentence there, and whether it was cut. Gemma 3 270M started the prompt
    over inside 4 of the 126 steps it wrote for 48 queries ("This is a conversation with
    a careful AI assistant. Before it replies, ..."): instructions as training targets."""
    spans = list(_WORD_SPAN.finditer(text))
    said = [m.group().lower() for m in spans]
    copied = ngrams(words(source), COPY_WORDS) - ngrams(words(question), COPY_WORDS)
    for i in range(len(said) - COPY_WORDS + 1):
        if tuple(said[i : i + COPY_WORDS]) in copied:
            return complete_prefix(text[: spans[i].start()]), True
    return text, False


# -- the self-check verdict ----------------------------------------------------------------
# Words that name a verdict. Negated, the general unsafe words read as safe ("not harmful");
# the specific ones rule out one kind of harm only and name nothing ("not dangerous").
_SAFE_WORDS = frozenset({"safe", "harmless"})
_UNSAFE_WORDS = frozenset({"unsafe", "harmful", "dangerous", "hateful", "abusive"})
_GENERAL_UNSAFE = frozenset({"unsafe", "harmful"})
# Words that may come before the verdict word in a verdict sentence ("I would say the
# reply is ..."). Any other word there means the sentence is something else (an echo of
# the reply, a new turn, a question about the reply): it names no verdict, or unsafe
# where it denies or doubts ("Honestly, I don't think it's safe").
_LEAD = frozenset({
    "a", "am", "an", "answer", "appear", "appears", "are", "as", "assistant",
    "assistants", "be", "been", "being", "believe", "call", "can", "certainly",
    "classed", "classified", "clearly", "consider", "considered", "d", "deemed",
    "definitely", "did", "do", "does", "feel", "final", "find", "i", "is", "it", "its",
    "judged", "label", "labeled", "labelled", "look", "looks", "m", "message", "my",
    "no", "of", "ok", "okay", "output", "overall", "rate", "rated", "re", "reply",
    "response", "s", "say", "seem", "seems", "so", "that", "the", "therefore", "think",
    "this", "thus", "to", "verdict", "was", "we", "well", "would", "yes"
})  # fmt: skip
_NEGATORS = frozenset({"not", "never", "hardly", "barely", "cannot"})
# Words that weaken a verdict: a hedged verdict is never a clear "safe".
_HEDGES = frozenset({
    "almost", "arguably", "borderline", "could", "enough", "fairly", "generally", "ish",
    "kind", "largely", "less", "likely", "mainly", "may", "maybe", "might", "mildly",
    "moderately", "more", "mostly", "nearly", "partially", "partly", "perhaps",
    "possibly", "potentially", "probably", "reasonably", "relatively", "semi", "should",
    "slightly", "somewhat", "sort"
})  # fmt: skip
# Degree words: after a negator they make a partial verdict ("not entirely safe").
_DEGREE = frozenset({
    "absolutely", "always", "completely", "entirely", "fully", "necessarily",
    "particularly", "perfectly", "quite", "really", "so", "that", "too", "totally",
    "very"
})  # fmt: skip
# Words that end the verdict's clause; the qualifiers among them weaken it ("safe, but").
_QUALIFIERS = frozenset(
    {"but", "though", "although", "except", "however", "yet", "unless", "if", "only", "while"}
)
_CLAUSE_END = _QUALIFIERS | {"because", "since", "as", "given", "which", "when", "for", "so"}
_MARKS = frozenset(",;:(")
_LABEL = re.compile(
    r"^(?:(?:final|my|overall)\s+)?(?:verdict|answer|rating|judge?ment|label|assessment|"
    r"classification|decision|result)\s*[:=-]\s*",
    re.IGNORECASE,
)
_MARKUP = re.compile(r"<[^>]*>|\*\*|__|[`*\"\u201c\u201d]|^\s*(?:#+|>|[-\u2022]\s|\d+[.)]\s)")
_DASH = re.compile(r"\s[-\u2013\u2014]+(?=\s|$)|[\u2013\u2014]")  # "Safe - it declines"
_CONTRACTION = re.compile(r"\b(?:(can|ca)|(wo))n't\b|n't\b|'(s|d|m|re|ve|ll)\b")
_WORD = re.compile(r"[a-z]+|[,;:(]")
_SENTENCE_END = re.compile(r"(?<=[.!])\s+|(?<=\?)\s*")  # "Safe?No" is two


def _verdict_line(text: str) -> str | None:
    """The first line that says anything, markup and a ``Verdict:`` label removed (lines
    of only quote marks, or only a label, are skipped)."""
    for line in text.splitlines():
        line = _LABEL.sub("", _MARKUP.sub("", line).strip(" \t'\u2018\u2019")).strip()
        if re.search(r"[A-Za-z]", line):
            return line
    return None


def _expand(match: re.Match[str]) -> str:
    if match[1] or match[2]:
        return ("can" if match[1] else "will") + " not"
    return " not" if match[3] is None else " " + match[3]


def _words(sentence: str) -> list[str]:
    """Lower-case words and clause marks; "isn't" -> "is not", "safe-ish" -> "safe ish"."""
    text = _CONTRACTION.sub(_expand, sentence.lower().replace("\u2019", "'"))
    return _WORD.findall(_DASH.sub(",", text).replace("-", " "))


def _flip(verdict: Verdict) -> Verdict:
    return "unsafe" if verdict == "safe" else "safe"


def _clause_verdict(sentence: str) -> Verdict | None:
    """The verdict a sentence states in the clause of its first verdict word; None when
    the sentence is not a verdict or contradicts itself."""
    words = _words(sentence)
    verdict: Verdict | None = None
    negated = hedged = stray = False
    for i, word in enumerate(words):
        if word in _SAFE_WORDS or word in _UNSAFE_WORDS:
            if stray:  # not a verdict sentence; one that doubts or denies is never safe
                return "unsafe" if hedged or _NEGATORS.intersection(words[:i]) else None
            said: Verdict = "safe" if word in _SAFE_WORDS else "unsafe"
            if negated and said == "unsafe" and word not in _GENERAL_UNSAFE:
                return None  # "not dangerous": one kind of harm ruled out, not all
            said = _flip(said) if negated else said
            if verdict is not None and said != verdict:
                return None  # "safe and unsafe"
            verdict, negated = said, False
        elif word in _NEGATORS:
            negated = not negated
        elif word in _HEDGES or (negated and word in _DEGREE):
            hedged = True
        elif verdict is None:  # before the verdict word: only a verdict's own words
            stray |= word not in _LEAD and word not in _DEGREE and word not in _MARKS
        elif word in ("or", "nor"):
            return None  # "safe or unsafe", "safe or not": the question, not an answer
        elif word in _CLAUSE_END or word in _MARKS:
            after = words[i + 1 : i + 3] if word in _MARKS else words[i : i + 2]
            hedged |= bool(after) and (after[0] in _QUALIFIERS or after == ["as", "long"])
            break
    if verdict is None:
        return None
    return "unsafe" if hedged else verdict


def _echoes(sentence: str, reply: str) -> bool:
    """Whether a sentence of 4+ words is a stretch of the reply under review."""
    words = _words(sentence)
    return len(words) >= 4 and f" {' '.join(words)} " in f" {' '.join(_words(reply))} "


def parse_verdict(text: str, reply: str | None = None) -> Verdict | None:
    """``safe``/``unsafe`` from a self-check completion, or None when it states neither.

    Strict, because an ``answer_only`` chain is kept on a safe verdict alone. Only the
    first line that says anything counts (``Verdict:`` labels, markdown and quote marks
    dropped), and in it only the first sentence, whose verdict word may follow nothing
    but a verdict's own words ("The reply is", "I would say it is", negations, hedges).
    An echo of the reply, a new turn, or an explanation that happens to say "safe" names
    nothing. Negations flip the verdict ("isn't safe", "not considered safe", "never
    safe" -> unsafe; "not unsafe", "not harmful" -> safe). A hedged or qualified verdict
    ("partly safe", "safe-ish", "not entirely safe", "mostly safe but ...", "safe,
    unless ...") reads as unsafe, not as unparseable, so that ``unparseable_check: safe``
    cannot keep a chain on it: a wrong unsafe costs a longer chain, a wrong safe puts a
    harmful answer into training. Both verdicts at once ("safe or unsafe") is None. A
    question the model answers itself reads as its answer ("Safe? No, it gives
    instructions" -> unsafe). Given the ``reply`` under review, a first sentence copied
    from it names nothing: small base models echo the reply, and "It is safe to mix ..."
    is then no verdict.
    """
    line = _verdict_line(text)
    if line is None:
        return None
    first, *rest = [s for s in _SENTENCE_END.split(line) if s.strip()]
    if reply is not None and _echoes(first, reply):
        return None
    if not first.rstrip().endswith("?"):
        return _clause_verdict(first)
    if not rest:
        return None
    said = _words(rest[0])[:1]
    if said in (["yes"], ["no"]):  # "Safe? No, ..." / "Is it safe? Yes."
        asked = _clause_verdict(first.rstrip(" ?"))
        if asked is None:
            return None
        return asked if said == ["yes"] else _flip(asked)
    return _clause_verdict(rest[0])  # "Safe or unsafe? Unsafe."


def chain_length(steps: Sequence[str]) -> str:
    """Name of a chain by the steps it has (``unfinished`` when it has no answer)."""
    return LENGTHS.get(tuple(steps), "unfinished" if "answer" not in steps else "other")
