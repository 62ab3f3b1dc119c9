"""Parsing and filtering of hand-written list continuations, one verdict per item."""

from __future__ import annotations

import pytest

from selfalign.annotations.loaders import SeedTask
from selfalign.backends import GenerationResult
from selfalign.backends.base import cut_at_stop
from selfalign.stages.self_instruct import (
    SelfInstructConfig,
    build_pool,
    round_requests,
    screen_round,
)
from selfalign.text.parsing import ItemFilter, format_task, list_prompt, parse_continuation

F = ItemFilter()


def parse(continuation: str, first: int = 6, truncated: bool = False) -> list:
    return parse_continuation(continuation, first, truncated=truncated, item_filter=F)


def verdicts(continuation: str, first: int = 6, truncated: bool = False) -> list:
    return [(i.number, i.verdict) for i in parse(continuation, first, truncated)]


WELL_FORMED = (
    " Write a short poem about autumn leaves falling.\n"
    "###\n"
    "7. Instruction: Translate the sentence into French.\n"
    "   Input: The cat sleeps on the warm windowsill.\n"
    "###\n"
    "8. Instruction: Give three tips for keeping houseplants alive.\n"
    "###"
)

# Item 7's input is an email with blank lines between its paragraphs.
EMAIL = (
    "Hi team,\n"
    "\n"
    "The quarterly numbers are in. Sales went up 4% but we spent far more on shipping than "
    "we planned, mostly because of the late orders in March.\n"
    "\n"
    "Can everyone send me their ideas for cutting costs before Friday?\n"
    "\n"
    "Best,\n"
    "Dana"
)
EMAIL_LIST = (
    " Suggest a name for a new coffee shop near a university.\n"
    "###\n"
    "7. Instruction: Write a polite reply to this email that agrees to help.\n"
    f"   Input: {EMAIL}\n"
    "###\n"
    "8. Instruction: Explain the difference between weather and climate.\n"
    "###\n"
)


def test_well_formed_items_pass_with_inputs():
    items = parse(WELL_FORMED)
    assert [(i.number, i.verdict) for i in items] == [(6, None), (7, None), (8, None)]
    assert items[0].instruction == "Write a short poem about autumn leaves falling."
    assert items[0].input == ""
    assert items[1].instruction == "Translate the sentence into French."
    assert items[1].input == "The cat sleeps on the warm windowsill."
    assert items[2].raw == "8. Instruction: Give three tips for keeping houseplants alive."


def test_prompt_format_round_trips_through_the_parser():
    tasks = [
        ("Sum the numbers in the list.", "1, 2, 3"),
        ("Name three rivers in Africa.", ""),
        ("Shorten this note to one sentence.", "Dear Sam,\n\nThe van comes at nine.\n\nJo"),
    ]
    prompt, nxt = list_prompt("HEADER\n", tasks)
    assert nxt == 4 and prompt.endswith("###\n4. Instruction:")
    body = prompt[len("HEADER\n") :]
    assert body.startswith(format_task(1, *tasks[0]))
    assert format_task(2, *tasks[1]) == "2. Instruction: Name three rivers in Africa.\n###\n"
    items = parse(body[len("1. Instruction:") :], first=1)
    assert [(i.instruction, i.input, i.verdict) for i in items[:3]] == [
        (*tasks[0], None),
        (*tasks[1], None),
        (*tasks[2], None),
    ]


def test_a_multi_paragraph_input_is_kept_whole():
    items = parse(EMAIL_LIST)
    assert [(i.number, i.verdict) for i in items] == [(6, None), (7, None), (8, None)]
    assert items[1].input == EMAIL
    assert items[2].instruction == "Explain the difference between weather and climate."


def test_generation_stops_after_the_last_item_not_at_a_blank_line():
    """What the backend returns under the round's stop strings: the list's limit is 6, the
    model wrote on to item 7, and the email's blank lines do not end item 5."""
    cfg = SelfInstructConfig(requests_per_round=1, max_list_number=6)
    pool = build_pool([SeedTask("s1", "Name three rivers in Europe.", "")], [], threshold=0.7)
    [(request, parents, first)] = round_requests(pool, cfg, 0, lambda *parts: 7)
    assert first == 2
    tasks = [
        ("Explain how a rainbow forms in simple words.", ""),
        ("Explain how the gears of a bicycle work.", ""),
        ("Give three reasons to learn a second language.", ""),
        ("Write a polite reply to this email that agrees to help.", EMAIL),
        ("Give three tips for a first job interview.", ""),
        ("Describe a sunset over the sea to a child.", ""),
    ]
    written = "".join(format_task(n, *task) for n, task in enumerate(tasks, 2))
    text = cut_at_stop(written[len("2. Instruction:") :], request.params.stop)
    assert text.endswith("interview.\n###")
    batch = screen_round(0, [(GenerationResult(text), parents, first)], pool, F)
    assert [(r["instruction"], r["input"]) for r in batch.keep] == tasks[:5]
    assert batch.drop == []


@pytest.mark.parametrize(
    "tail, finish, reason",
    [
        # cut by the token limit inside item 9's input, between two paragraphs
        ("9. Instruction: Summarize the email in two sentences.\n   Input: Hi team,\n\nThe "
         "quarterly numbers are in. Sales went", "length", "truncated"),
        # the model ended the text (or a stop string cut it) before closing item 9
        ("9. Instruction: Summarize the email in two sentences.\n   Input: Hi team,", "stop",
         "incomplete"),
        ("9. Instruction: List four birds that cannot fly.\n", "stop", "incomplete"),
    ],
)  # fmt: skip
def test_an_item_not_closed_by_a_separator_is_never_kept(tail, finish, reason):
    text = WELL_FORMED + "\n" + tail
    got = verdicts(text, truncated=finish == "length")
    assert got == [(6, None), (7, None), (8, None), (9, reason)]


def test_an_item_closed_by_the_next_item_header_is_complete():
    """A model that drops a separator still delimits the item by the next item's line."""
    text = (
        " Rewrite the sentence in the passive voice.\n"
        "   Input: The chef cooked a wonderful meal.\n\n"
        "7. Instruction: Give an example of a simile.\n"
        "###\n"
        "Here are some more tasks:\n\n"  # between items: belongs to no item
        "8. Instruction: Explain why the sky looks blue during the day.\n"
        "###\n"
    )
    items = parse(text)
    assert [(i.number, i.verdict) for i in items] == [(6, None), (7, None), (8, None)]
    assert items[0].input == "The chef cooked a wonderful meal."


def test_wrong_numbers_are_dropped_and_the_sequence_resyncs():
    text = (
        " Describe the smell of fresh bread in detail.\n###\n"
        "9. Instruction: Explain why leaves change colour in autumn.\n###\n"
        "10. Instruction: List four ways to save water at home.\n###\n"
        "1. Instruction: Suggest a name for a friendly robot dog.\n###\n"
    )
    assert verdicts(text) == [(6, None), (9, "bad_numbering"), (10, None), (1, "bad_numbering")]


@pytest.mark.parametrize(
    "instruction, verdict",
    [
        ("Draw a cat sitting on a fence at night.", "blacklisted_word"),
        ("Describe the image shown above in two sentences.", "blacklisted_word"),
        ("Please GO   TO the store and buy some milk.", "blacklisted_word"),  # multiword, any case
        ("Summarize the plot of a famous film.", "blacklisted_word"),  # METHOD's list, any sense
        ("Update your profile description to sound friendlier.", None),  # "file" inside a word
        ("¿Cuál es la capital de Francia y por qué?", "bad_start"),  # non-ASCII start
        ("Über die Geschichte Berlins, schreibe drei Sätze.", "bad_start"),
        ("- Write a list of five fruits.", "bad_start"),  # punctuation start
        ('"Explain gravity to a child," she said.', "bad_start"),
        ("Write a poem.", "too_short"),  # 3 words < 4
        ("Write a short poem.", None),  # exactly 4 words
        ("Explain " + "very " * 149 + "slowly.", "too_long"),  # 151 words > 150
    ],
)
def test_item_filters(instruction, verdict):
    assert verdicts(f" {instruction}\n###\n")[0] == (6, verdict)


@pytest.mark.parametrize(
    "instruction, input_text, verdict",
    [
        ("Summarize the main points for the team.",
         "Please read the attached file before the meeting. It has the minutes from Monday and "
         "the budget for next year.", "blacklisted_word"),
        ("Describe what is happening in the scene.",
         "[photo of a crowded beach at sunset, with two dogs chasing a ball]", "blacklisted_word"),
        ("Suggest a better title for the post.",
         "**How I Learned To Love Mornings**\n\nFor years I hated my alarm. Then I started "
         "going to the bakery at six.", None),  # "going to" is not "go to"
        ("Classify the review as positive or negative.",
         "The hotel room was tiny and the Wi-Fi kept dropping.", None),
    ],
)  # fmt: skip
def test_the_blacklist_covers_the_input(instruction, input_text, verdict):
    text = f" {instruction}\n   Input: {input_text}\n###\n"
    [item] = parse(text)
    assert (item.input, item.verdict) == (input_text, verdict)


def test_an_alpaca_style_output_is_cut_off():
    text = (
        " Classify the sentiment of the customer review.\n"
        "   Input: The parcel arrived two weeks late and the box was crushed.\n"
        "   Output: Negative\n"
        "###\n"
        "7. Instruction: What is the capital city of Australia?\n"
        "7. Output: The capital of Australia is Canberra.\n\n"
        "Many people think it is Sydney, but Canberra was chosen as a compromise.\n"
        "###\n"
        "8. Instruction: Convert the recipe to metric units.\n"
        "   Output: 250 g flour, 2 eggs\n"
        "   Input: 2 cups flour, 2 eggs\n"  # an input after the answer: the order is wrong
        "###\n"
        "9. Instruction: Fix the spelling in the sentence.\n"
        "   Input: I recieved your mesage.\n"
        "   10. Output: I received your message.\n"  # numbered for another item
        "###\n"
    )
    items = parse(text)
    assert [(i.number, i.verdict) for i in items] == [
        (6, None), (7, None), (8, "malformed"), (9, "malformed"),
    ]  # fmt: skip
    assert (items[0].instruction, items[0].input) == (
        "Classify the sentiment of the customer review.",
        "The parcel arrived two weeks late and the box was crushed.",
    )
    assert (items[1].instruction, items[1].input) == (
        "What is the capital city of Australia?",
        "",
    )
    assert items[1].raw.endswith("chosen as a compromise.")  # the raw text keeps the answer


def test_malformed_items():
    text = (
        " \n###\n"  # empty instruction
        "7. Instruction: Correct the grammar of the sentence.\n"
        "   Input: me and him goes home\n"
        "   Input: a second input line\n###\n"  # two input lines
        "8. Instruction: Rewrite the sentence more formally.\n"
        "9. Input: hey whats up\n###\n"  # input numbered for another item
        "9. Instruction: Name the largest planet in our solar system.\n###\n"
        "10. Instruction: Explain why the sea is salty.\n"
        "Then list three other salty lakes.\n###\n"  # the instruction runs past its line
        "11. Instruction: Reverse the words of the sentence.\n"
        "   Input: one two\n   three four\n###\n"  # a multi-line input is fine
    )
    assert verdicts(text) == [
        (6, "malformed"), (7, "malformed"), (8, "malformed"), (9, None), (10, "malformed"),
        (11, None),
    ]  # fmt: skip
    items = parse(text)
    assert items[-1].input == "one two\n   three four"
    assert items[-2].instruction == "Explain why the sea is salty."


def test_screen_round_applies_rouge_against_pool_and_within_the_round():
    seeds = [SeedTask("s1", "Write a short poem about the sea at night.", "")]
    pool = build_pool(seeds, [], threshold=0.7)
    text = (
        " Write a short poem about the sea at night time.\n###\n"  # near-duplicate of the seed
        "7. Instruction: Explain how vaccines train the immune system.\n###\n"
        "8. Instruction: Explain how vaccines train our immune system.\n###\n"  # duplicate of 7
        "9. Instruction: Draw a map of your neighbourhood.\n###\n"
        "10. Instruction: Give three tips for a job interview"
    )
    outputs = [(GenerationResult(text, finish_reason="length"), ["s1"], 6)]
    batch = screen_round(3, outputs, pool, F)
    kept = [r["instruction"] for r in batch.keep]
    assert kept == ["Explain how vaccines train the immune system."]
    reasons = {(r.get("instruction"), why) for r, why in batch.drop}
    assert reasons == {
        ("Write a short poem about the sea at night time.", "near_duplicate"),
        ("Explain how vaccines train our immune system.", "near_duplicate"),
        ("Draw a map of your neighbourhood.", "blacklisted_word"),
        ("Give three tips for a job interview", "truncated"),
    }
    similar = {
        r["instruction"]: r["similar_to"] for r, why in batch.drop if why == "near_duplicate"
    }
    assert similar["Write a short poem about the sea at night time."] == "s1"
    assert similar["Explain how vaccines train our immune system."] == batch.keep[0]["id"]
    rec = batch.keep[0]
    assert rec["source"] == "self_instruct" and rec["round"] == 3 and rec["parents"] == ["s1"]
    assert pool.ids == ["s1", rec["id"]]  # kept items join the pool
    assert len({r["id"] for r, _ in batch.drop} | {rec["id"]}) == 5  # ids unique


def test_a_round_with_a_failed_request_commits_nothing():
    pool = build_pool([SeedTask("s1", "Name three rivers in Europe.", "")], [], threshold=0.7)
    outputs = [
        (GenerationResult(" Explain how tides work on the coast.\n###\n"), ["s1"], 2),
        (GenerationResult("", finish_reason="error", error="HTTP 503"), ["s1"], 2),
    ]
    batch = screen_round(0, outputs, pool, F)
    assert batch.keep == [] and batch.drop == []
    assert [(r["round"], why) for r, why in batch.failed] == [(0, "HTTP 503")]
    assert pool.ids == ["s1"] and pool.dedup.size == 1
