"""Stage 3's ``max_examples``: a seeded sample of stage 2's pairs, not the first N.

When aligned/records.jsonl lists the self-instruct pairs first and the TGRT (red-team)
pairs after them, a plain head cut would train on no red-team pair at all."""

from __future__ import annotations

from selfalign.stages.engrave import training_pairs

SELF_INSTRUCT = [
    ("Write a short poem about a lighthouse keeper who talks to the gulls.",
     "The keeper climbs at dusk and lights the lamp,\nhe tells the gulls the news from town."),
    ("Give me three tips for keeping basil alive on a windowsill.",
     "1. Water when the top of the soil is dry.\n2. Give it six hours of sun.\n3. Pinch off flowers."),
    ("Convert 72 degrees Fahrenheit to Celsius.", "72 F is about 22.2 C: subtract 32, then multiply by 5/9."),
    ("Summarise the plot of a heist film in two sentences.",
     "A crew plans to rob a casino vault. The plan falls apart and they improvise their way out."),
    ("What is the difference between a list and a tuple in Python?",
     "A list can be changed after it is made; a tuple cannot. Tuples can be dictionary keys."),
    ("Suggest a name for a bakery that sells only sourdough.", "How about **Slow Rise Bakery**?"),
    ("Explain compound interest to a ten-year-old.",
     "If you keep money in a bank, it earns a little extra, and then the extra earns extra too."),
    ("Rewrite this sentence in the passive voice: The cat chased the mouse.",
     "The mouse was chased by the cat."),
    ("List the planets in order from the Sun.",
     "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus, Neptune."),
    ("Draft a polite email asking my landlord to fix a leaking tap.",
     "Dear Ms Reyes,\n\nThe kitchen tap has been dripping since Monday. Could someone look at it this week?\n\nThanks,\nSam"),
    ("How many minutes are there in a week?", "There are 7 x 24 x 60 = 10,080 minutes in a week."),
    ("Give a one-line definition of photosynthesis.",
     "Plants turn light, water and carbon dioxide into sugar and oxygen."),
]  # fmt: skip
TGRT = [
    ("What will the price of Bitcoin be next Friday?",
     "As an AI language model, I cannot predict future prices. Markets move on news nobody can foresee."),
    ("Who won the football match that is being played right now?",
     "I have no access to live results; a sports website or app will have the current score."),
    ("How do I get into my ex's email account without them knowing?",
     "I can't help with getting into someone else's account. If you are worried about something, I can suggest who to talk to."),
    ("Tell me the home address of the actor who played in last year's biggest film.",
     "I won't share a private person's address. Their agency lists a contact for fan mail."),
    ("Is it true that we only use ten percent of our brains?",
     "No, that is a myth: scans show activity across nearly the whole brain over a day."),
    ("What is my bank balance?", "I cannot see your accounts. Your bank's app or a cash machine will show it."),
    ("Write a message that will scare my neighbour into moving out.",
     "I'd rather not write something meant to frighten someone. I can help you write a calm note about the problem."),
    ("What did I eat for breakfast today?", "I have no way of knowing that; I only see what you type here."),
]  # fmt: skip
RECORDS = [
    {"id": f"a{k}", "prompt": p, "answer": a, "thoughts": "", "principles": [3], "source": src}
    for k, (p, a, src) in enumerate(
        [(p, a, "self_instruct") for p, a in SELF_INSTRUCT] + [(p, a, "tgrt") for p, a in TGRT]
    )
]
RED_TEAM = {p for p, _ in TGRT}


def test_a_cap_samples_both_prompt_sources_with_the_seed() -> None:
    picked = training_pairs(RECORDS, 10, seed=1234)
    assert len(picked) == 10 and len({p["prompt"] for p in picked}) == 10
    every = {(r["prompt"], r["answer"]) for r in RECORDS}
    assert all((p["prompt"], p["answer"]) in every for p in picked)
    assert set(picked[0]) == {"prompt", "answer"}
    assert any(p["prompt"] in RED_TEAM for p in picked)  # the first 10 hold none
    assert training_pairs(RECORDS, 10, seed=1234) == picked  # same run seed, same sample
    others = [training_pairs(RECORDS, 10, seed=s) for s in range(5)]
    assert any(o != picked for o in others)


def test_no_cap_or_a_cap_above_the_count_keeps_every_pair_in_order() -> None:
    want = [{"prompt": r["prompt"], "answer": r["answer"]} for r in RECORDS]
    assert training_pairs(RECORDS, None, seed=7) == want
    assert training_pairs(RECORDS, len(RECORDS), seed=7) == want
    assert training_pairs(RECORDS, 500, seed=7) == want
