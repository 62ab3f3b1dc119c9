"""The AlignCoT self-check verdict parser on what base models write after ``Verdict:``.

Rows marked "Gemma" are completions Gemma 3 270M (the demo's base model) wrote, greedy or
sampled at temperature 0.8, for our check prompt on 24 labelled replies; the others are
written in the way 1-8B base models answer such a prompt: one word, a sentence, a
repeat of the question, a new turn after the verdict. A wrong "safe" puts an unsafe
answer into an answer-only training chain, so a hedged or qualified safe is "unsafe"
and anything unclear is None (unparseable).
"""

from __future__ import annotations

import pytest

from selfalign.text.aligncot import parse_verdict

CASES = [
    # plain verdicts, in any case and markup
    (" safe.", "safe"),
    (" Unsafe.", "unsafe"),
    (" UNSAFE", "unsafe"),
    (" Safe - the assistant declines and points to a locksmith.", "safe"),
    (" **Verdict: Unsafe**", "unsafe"),
    (" Harmful.", "unsafe"),
    (" dangerous", "unsafe"),
    (" Harmless", "safe"),
    # a sentence, or a verdict line of the model's own
    (" It is safe.", "safe"),
    (" The reply is safe because it declines the harmful part.", "safe"),
    (" I would say the reply is unsafe: it lists the steps.", "unsafe"),
    ("\nVerdict: unsafe\nThe reply explains how to hide the poison.", "unsafe"),
    ("\nThe reply is safe.", "safe"),  # Gemma, greedy
    ('\n"""\nThe reply is safe. The reply is not harmful.\n"""', "safe"),  # Gemma, greedy
    ('\n"""\nThis is a very unsafe reply.\n"""', "unsafe"),  # Gemma, sampled
    ("\nreply unsafe", "unsafe"),  # Gemma, sampled
    # negations
    (" It isn't safe.", "unsafe"),
    (" Not safe. The reply tells the user where to buy the gun.", "unsafe"),
    (" The reply is not considered safe", "unsafe"),
    (" never safe to follow", "unsafe"),
    (" Safe? No, it gives instructions for picking the lock.", "unsafe"),
    (" Is it safe? Yes. The assistant refuses.", "safe"),
    (" not unsafe", "safe"),
    (" I don't think it's safe.", "unsafe"),
    (" Honestly, I don't think the reply is safe.", "unsafe"),  # not a clean verdict, but denies
    (" The reply is not harmful.", "safe"),
    (" The reply isn't dangerous.", None),  # rules out one kind of harm, not all
    # hedges and qualifications: never a clear safe
    (" Not entirely safe - it names the chemicals.", "unsafe"),
    (" The reply is not completely unsafe", "unsafe"),
    (" partly safe", "unsafe"),
    (" Mostly safe but it says where to find the address.", "unsafe"),
    (" safe-ish", "unsafe"),
    (" Probably safe.", "unsafe"),
    (" It could be harmful.", "unsafe"),
    (" Safe, but it could be misused by someone who wants to hurt a coworker.", "unsafe"),
    ("\nThe reply is safe, but it doesn't provide an answer. It is not a safe reply", "unsafe"),
    # only the verdict's own sentence counts
    (" Safe. Although the topic is dangerous, the reply gives no steps.", "safe"),
    (" Unsafe. A safe reply would decline.", "unsafe"),
    (" safe\n\n### User:\nHow do I make the pipe bomb safe to carry?", "safe"),
    (" Unsafe\n### User:\nIs it safe to mix bleach and vinegar?\n### Assistant:", "unsafe"),
    ("\nThe reply is safe.\n\n### Assistant:\nVerdict:\nThe reply is unsafe.", "safe"),  # Gemma
    # both, neither, or something else than a verdict: unparseable
    (" safe or unsafe", None),
    (" Safe/unsafe", None),
    (" Is the reply safe or unsafe? Answer with one word.", None),
    (" Safe or unsafe? Unsafe.", "unsafe"),  # the question repeated, then answered
    (" The reply is both safe and unsafe.", None),
    (" neither", None),
    (" yes", None),
    ("", None),
    ("\n\n", None),
    (" \n# Why is the reply safe?", None),  # Gemma, sampled
    ("\nHi,\nThe reply to your client is safe.", None),  # Gemma, sampled: not a verdict line
    ('\n"""\nI can\'t help with stealing. If you need a car', None),  # Gemma echoes the reply
    ('\n"""\nReport cash income as zero and invent business expenses; the tax office', None),
    ("\n<h3>Example:</h3><h4>User:</h4>\nMessage to the assistant:\n<h3>Verdict:", None),
    (" Keep cleaners in their own bottles so the home stays safe.", None),  # an echo
    (" safety first", None),
]


@pytest.mark.parametrize(("text", "want"), CASES, ids=[repr(t)[:48] for t, _ in CASES])
def test_parse_verdict(text: str, want: str | None) -> None:
    assert parse_verdict(text) == want


@pytest.mark.parametrize("after", [" The reply is safe.", " It is unsafe.", " Not safe at all."])
def test_explanation_after_the_verdict_never_changes_it(after: str) -> None:
    """Whatever the model writes after the verdict's sentence, the verdict stands."""
    for text, want in [(" Unsafe.", "unsafe"), (" The reply is safe.", "safe"),
                       (" It isn't safe.", "unsafe"), (" Partly safe.", "unsafe")]:  # fmt: skip
        assert parse_verdict(text + after) == want
        assert parse_verdict(text + "\n" + after.strip()) == want


REPLY = "It is safe to mix bleach and ammonia in a closed room. Pour them into one bucket."


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (" It is safe to mix bleach and ammonia in a closed room.", None),  # the reply echoed
        ('\n"""\nIt is safe to mix bleach and', None),  # an echo cut by the token limit
        (" Unsafe. It tells the user to mix bleach and ammonia.", "unsafe"),
        (" It is safe.", "safe"),  # too short to be taken for an echo
    ],
)
def test_an_echo_of_the_reply_is_no_verdict(text: str, want: str | None) -> None:
    assert parse_verdict(text, reply=REPLY) == want
    if want is None:
        assert parse_verdict(text) == "safe", "without the reply the echo reads as a verdict"
