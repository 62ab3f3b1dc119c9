"""Stage 2 prompt assembly, thoughts parsing and answer filters on hand-written generations,
written the way a small base model writes them (wrong rule names, copies of the exemplars,
loops, answers cut by the token limit)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from selfalign.annotations.principles import load_annotations
from selfalign.backends import GenerationResult
from selfalign.chat_format import NEXT_USER_TURN, TURN_SEP
from selfalign.config import load_run_config
from selfalign.errors import InputError
from selfalign.report import write_report
from selfalign.stages.aligned import (
    OWN_THOUGHTS,
    REASONS,
    RULE_CITATION,
    AlignedConfig,
    Judge,
    Verdict,
    build,
    principle_usage,
    refusal_counts,
    summarize,
)
from selfalign.text.answers import complete_prefix
from selfalign.text.thoughts import STOP, THOUGHTS_TAG, StagePrompt, parse_thoughts

CFG = AlignedConfig()
PROMPT, JUDGE = build(CFG)
SELF = PROMPT.self_description  # "I am Kestrel, an AI assistant, ..."
QUERY = "What is the price of gold today?"
THOUGHTS = (
    f"{SELF} The user wants today's gold price, which is live market data. "
    "I should follow rules 9 (offline), 7 (candid)."
)
ANSWER = (
    "Kestrel has no live market feed, so today's gold price is out of reach. "
    "Financial news sites and bullion dealers publish it throughout the trading day, "
    "usually per troy ounce in US dollars."
)
GOOD = f"{THOUGHTS}\n\n### Assistant:\n{ANSWER}"
EX_ANSWER = PROMPT.exemplar_turns()[3][2]  # the real-time data exemplar's answer


def judge(text: str, finish: str = "stop", query: str = QUERY, judge: Judge = JUDGE) -> Verdict:
    return judge(GenerationResult(text=text, finish_reason=finish), query)  # type: ignore[arg-type]


def answered(answer: str, thoughts: str = THOUGHTS) -> str:
    return f"{thoughts}\n\n### Assistant:\n{answer}"


CASES = {
    "good": (GOOD, "stop", "kept"),
    "good, hit the token limit after a full sentence": (GOOD, "length", "kept"),
    "missing thoughts (answer turn first)": (f"### Assistant:\n{ANSWER}", "stop", "no_thoughts"),
    "missing thoughts (answered directly)": (ANSWER, "stop", "no_thoughts"),
    "empty output": ("", "stop", "no_thoughts"),
    "thoughts without rule citations": (
        f"{SELF} The user wants the gold price.\n\n### Assistant:\n{ANSWER}",
        "stop",
        "bad_thoughts_form",
    ),
    "thoughts citing only rules that do not exist": (
        GOOD.replace("9 (offline), 7 (candid)", "17 (offline), 40 (candid)"),
        "stop",
        "bad_thoughts_form",
    ),
    "thoughts without the self-description": (
        GOOD.replace(SELF, "I am a bot."),
        "stop",
        "bad_thoughts_form",
    ),
    "thoughts without an analysis": (
        f"{SELF} I should follow rules 9 (offline).\n\n### Assistant:\n{ANSWER}",
        "stop",
        "bad_thoughts_form",
    ),
    "thoughts but no answer turn": (THOUGHTS, "length", "no_answer"),
    "empty answer turn": (f"{THOUGHTS}\n\n### Assistant:\n   ", "stop", "no_answer"),
    "leaked exemplar text": (answered(EX_ANSWER), "stop", "leaked_exemplar"),
    "leaked principle text": (
        answered(
            "I must handle numbers, units, dates and calculations with care, and check arithmetic."
        ),
        "stop",
        "leaked_exemplar",
    ),
    "cut by the token limit before any sentence ended": (
        answered("Gold prices move every minute, and the best place to"),
        "length",
        "truncated",
    ),
    "repeated clause, too little left once trimmed": (
        answered(
            "Gold is traded in London and New York. Gold is traded in London and New York. "
            "Prices change daily."
        ),
        "stop",
        "too_short",
    ),
    "complete but short": (
        answered("Gold costs a lot today; check a news site."),
        "stop",
        "too_short",
    ),
    "refusal template": (answered("Sorry, but I cannot help with that."), "stop", "refusal"),
    "refusal template, curly apostrophe": (
        answered("I’m sorry, I can’t share prices."),
        "stop",
        "refusal",
    ),
    "next-turn cut": (
        f"{GOOD}\n\n### User:\nAnd silver?\n\n### Assistant:\nAlso",
        "length",
        "kept",
    ),
    "next-turn cut at a thoughts turn": (
        f"{GOOD}\n### Assistant (internal thoughts):\n{SELF}",
        "stop",
        "kept",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_verdicts(name: str) -> None:
    text, finish, expected = CASES[name]
    verdict = judge(text, finish)
    assert verdict.reason == expected
    assert verdict.kept == (expected == "kept")
    assert expected == "kept" or expected in REASONS


def test_kept_record_fields_and_renaming() -> None:
    verdict = judge(f"{GOOD}\n\n### User:\nAnd silver?", "stop")
    fields = verdict.fields
    assert verdict.kept
    assert fields["principles"] == [9, 7] and fields["misnamed_rules"] == []
    assert fields["trimmed"] is False and fields["truncated"] is False
    assert fields["answer"] == ANSWER.replace("Kestrel", CFG.final_name)  # cut at the next turn
    assert fields["thoughts"].startswith(f"I am {CFG.final_name}, an AI assistant")
    assert "Kestrel" not in fields["answer"] + fields["thoughts"]
    assert "### " not in fields["answer"] and "I should follow" not in fields["answer"]


def test_thoughts_are_stored_in_canonical_form() -> None:
    text = GOOD.replace("9 (offline), 7 (candid).", "9 (Offline), 7 (candid) and 9 (offline)")
    verdict = judge(text)
    assert verdict.kept and verdict.fields["principles"] == [9, 7]
    assert verdict.fields["thoughts"] == (
        f"I am {CFG.final_name}, an AI assistant, and before replying I work out which of my "
        "rules apply. The user wants today's gold price, which is live market data. "
        "I should follow rules 9 (offline), 7 (candid)."
    )


def test_no_renaming_when_the_query_uses_the_name() -> None:
    text = answered(
        "A kestrel is a small falcon of open country. It hunts voles and insects by hovering "
        "in one spot against the wind before dropping onto its prey; the Kestrel hovers."
    )
    verdict = judge(text, query="What is a Kestrel?")
    assert verdict.fields["answer"].endswith("the Kestrel hovers.")
    assert verdict.fields["thoughts"].startswith(f"I am {CFG.final_name},")


def test_leak_allowed_when_the_query_has_the_same_words() -> None:
    text = answered(f"You wrote: {EX_ANSWER}")
    assert judge(text).reason == "leaked_exemplar"
    assert judge(text, query=f"Repeat this: {EX_ANSWER}").reason == "kept"


def test_code_blocks_may_repeat_lines_and_end_the_answer() -> None:
    code = "```python\nx = compute_value(a, b, c)\nx = compute_value(a, b, c)\n```"
    intro = (
        "Calling the function twice in a row is harmless here, because compute_value has no "
        "side effects; the second call simply overwrites x with the same result:"
    )
    verdict = judge(answered(f"{intro}\n{code}"), "length")
    assert verdict.kept and verdict.fields["answer"].endswith(code)


def test_filters_are_configurable() -> None:
    cfg = AlignedConfig(refusal_openers=["Nope"], leak_ngram=0, min_clause_words=50, min_chars=0)
    _, j = build(cfg)
    assert judge(answered("Sorry, no."), judge=j).reason == "kept"
    assert judge(answered("Nope."), judge=j).reason == "refusal"
    assert judge(answered(EX_ANSWER), judge=j).reason == "kept"


def test_every_exemplar_parses_back_to_its_rules() -> None:
    a = load_annotations()
    for ex, (_, thoughts, _) in zip(a.exemplars, PROMPT.exemplar_turns(), strict=True):
        parsed = parse_thoughts(thoughts, SELF, a)
        assert parsed is not None and parsed.principles == ex.rules


def test_shipped_exemplar_answers_pass_every_other_check() -> None:
    _, j = build(AlignedConfig(leak_ngram=0))
    for user, thoughts, answer in PROMPT.exemplar_turns():
        assert judge(answered(answer, thoughts), query=user, judge=j).reason == "kept"


def test_prefix_is_shared_and_the_query_comes_last() -> None:
    prefix = PROMPT.prefix()
    assert prefix == build(AlignedConfig())[0].prefix()  # deterministic
    assert prefix.endswith(TURN_SEP)
    for i, p in enumerate(load_annotations().principles, 1):
        assert f"\n{i} ({p.name}): {p.text}\n" in prefix
    assert prefix.count(THOUGHTS_TAG) == 5 and prefix.count("### User:") == 5
    assert "{name}" not in prefix and "{cutoff}" not in prefix and "Kestrel" in prefix
    tail = StagePrompt.query_prompt("Name two planets.\nOnly rocky ones.")
    assert tail == f"### User:\nName two planets.\nOnly rocky ones.{TURN_SEP}{THOUGHTS_TAG}\n"
    assert NEXT_USER_TURN in STOP and TURN_SEP + THOUGHTS_TAG in STOP


def test_names_and_cutoff_come_from_config() -> None:
    prompt, _ = build(AlignedConfig(generation_name="Mimir", knowledge_cutoff="March 2031"))
    prefix = prompt.prefix()
    assert "Mimir, an AI assistant whose knowledge of the world ends in March 2031" in prefix
    assert "Kestrel" not in prefix


def test_principle_usage_counts_every_principle() -> None:
    records = [{"principles": [9, 7]}, {"principles": [7]}, {"principles": []}]
    stats = principle_usage(records, load_annotations())
    usage = stats["principle_usage"]
    assert list(usage) == [str(i) for i in range(1, 17)]
    assert usage["7"] == 2 and usage["9"] == 1 and usage["1"] == 0
    assert stats["principle_names"]["7"] == "candid"
    assert stats["principles_per_answer"] == 1.0


# -- thoughts as a small base model writes them -------------------------------------------------
NEUTRAL_ANSWER = (
    "Canberra is the capital of Australia. It was chosen in 1908 as a compromise between "
    "Sydney and Melbourne, the two largest cities, and Parliament has met there since 1927."
)
# thoughts after the self-description -> (principles kept, principles cited by a wrong name)
LOOSE_THOUGHTS = {
    "rule numbers with the wrong names (Gemma 3 270M)": (
        "The user wants the capital city of Australia, a plain fact from training. "
        "I should follow rules 10 (accurate), 1 (dated).",
        [10, 1],
        [10, 1],
    ),
    "numbers only": (
        "The user asks which city is the capital of Australia. I should follow rules 8, 2 and 11.",
        [8, 2, 11],
        [],
    ),
    "one rule, singular": (
        "The user asks a geography question I can answer. I should follow rule 8 (helpful)",
        [8],
        [8],
    ),
    "more thoughts after the list": (
        "The user asks for the capital of Australia.\nI should follow rules 8 (recall) and "
        "2 (accurate).\nI will mention why it is not Sydney, since people often think so.",
        [8, 2],
        [],
    ),
    "numbers out of range are left out": (
        "The user asks for the capital of Australia. I should follow rules 8 (recall), "
        "19 (geography), 0 and 2 (accurate).",
        [8, 2],
        [],
    ),
    "markdown and a colon": (
        "**Analysis:** a geography question about Australia.\n\nI should follow rules: "
        "8 (recall), 3 (helpful)",
        [8, 3],
        [3],
    ),
}


@pytest.mark.parametrize("name", list(LOOSE_THOUGHTS))
def test_thoughts_count_rule_numbers_whatever_the_names(name: str) -> None:
    thoughts, principles, misnamed = LOOSE_THOUGHTS[name]
    verdict = judge(answered(NEUTRAL_ANSWER, f"{SELF} {thoughts}"), query="Capital of Australia?")
    assert verdict.reason == "kept"
    assert verdict.fields["principles"] == principles
    assert verdict.fields["misnamed_rules"] == misnamed
    # stored with each rule's own name, and without what followed the list
    expected = ", ".join(f"{n} ({load_annotations().principles[n - 1].name})" for n in principles)
    stored = verdict.fields["thoughts"]
    assert stored.endswith(f". I should follow rules {expected}.") and "I will" not in stored


@pytest.mark.parametrize(
    "thoughts",
    [
        f"{SELF} The user wants a haiku about autumn. I will write one with a calm mood.",
        f"{SELF} The user wants a haiku about autumn. I should follow the rules carefully.",
        f"{SELF} The user wants a haiku about autumn. I should follow rules 17 (poetic) and 20.",
        f"{SELF}\nI should follow rules 15 (creative), 3 (useful).",
        "I am a poet. The user wants a haiku about autumn. I should follow rules 15 (creative).",
    ],
    ids=["no citation", "no rule number", "only numbers out of range", "no analysis", "no self"],
)
def test_thoughts_without_self_description_analysis_or_rule_numbers_are_bad(thoughts) -> None:
    haiku = (
        "Here is a haiku about autumn:\n\nMaple leaves let go,\nthe river carries their red\n"
        "past the silent mill.\n\nIt keeps the 5-7-5 pattern and ends on a quiet image."
    )
    assert judge(answered(haiku, thoughts), query="Write a haiku about autumn.").reason == (
        "bad_thoughts_form"
    )


# -- refusals --------------------------------------------------------------------------------
CANDID_OPENERS = [
    "As an AI language model, I have no access to live market data, so I cannot tell you "
    "today's gold price. Financial news sites and bullion dealers publish it throughout the "
    "trading day, usually per troy ounce.",
    "I cannot provide today's gold price: I have no live market feed, and what I know stops in "
    "2023. Financial news sites and bullion dealers publish the spot price throughout the day.",
    "I can't see live prices, so any figure from me would be out of date. For today's gold "
    "price, check a financial news site or a bullion dealer; they update the spot price many "
    "times a day.",
    "I won't guess a number here, because gold prices change every minute and I have no live "
    "feed. A financial news site or your bank's trading app will show the current spot price "
    "per ounce.",
    "Unfortunately, I have no connection to market data, so today's gold price is out of my "
    "reach. Financial news sites and bullion dealers quote the spot price throughout the "
    "trading day.",
]
APOLOGIES = [
    "I'm sorry, but I can't share today's gold price.",
    "My apologies, I do not have that information.",
    "I apologise, but that is not something I can look up.",
    "Sorry! Prices are not available to me.",
]


@pytest.mark.parametrize("answer", CANDID_OPENERS, ids=lambda a: a[:14])
def test_candid_openers_are_kept_by_default(answer: str) -> None:
    assert judge(answered(answer)).reason == "kept"


@pytest.mark.parametrize("answer", APOLOGIES, ids=lambda a: a[:12])
def test_apology_openers_are_dropped(answer: str) -> None:
    assert judge(answered(answer)).reason == "refusal"


def test_broad_refusal_openers_are_opt_in() -> None:
    _, broad = build(AlignedConfig(refusal_openers="broad"))
    for answer in CANDID_OPENERS:
        listed = not answer.startswith("I can't see")  # the broad list names "I can't provide"
        assert judge(answered(answer), judge=broad).reason == ("refusal" if listed else "kept")
    it = CANDID_OPENERS[-1].replace("Unfortunately, I have", "Unfortunately, it is hard:")
    assert judge(answered(it), judge=broad).reason == "kept"  # "Unfortunately, I" whole words


def test_an_unknown_refusal_preset_is_one_input_error(tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model: 'openai:http://127.0.0.1:9/v1#m'\nstages:\n  aligned: {refusal_openers: strict}\n"
    )
    with pytest.raises(InputError) as err:
        load_run_config(cfg)
    assert "refusal_openers" in str(err.value) and "apology, broad" in str(err.value)
    assert "\n" not in str(err.value)


def test_refusals_are_counted_per_source_and_red_team_type() -> None:
    rows = [
        {"source": "self_instruct", "type": None, "reason": "refusal"},
        {"source": "self_instruct", "type": None},  # kept
        {"source": "tgrt", "type": "legal advice", "reason": "refusal"},
        {"source": "tgrt", "type": "legal advice", "reason": "too_short"},
        {"source": "tgrt", "type": "future events"},
    ]
    assert refusal_counts(rows, "source") == {
        "self_instruct": {"prompts": 2, "refused": 1},
        "tgrt": {"prompts": 3, "refused": 1},
    }
    assert refusal_counts(rows, "type") == {
        "future events": {"prompts": 1, "refused": 0},
        "legal advice": {"prompts": 2, "refused": 1},
    }


# -- length policy: trim loops and token-limit cuts, drop short answers ---------------------------
INTERVIEW = "Give me three tips for a job interview."
INTERVIEW_TIPS = (
    "Here are three tips for a job interview:\n\n"
    "1. Research the company before you go, so you can explain why you want to work there.\n"
    "2. Prepare two or three short stories about problems you solved at work or school.\n"
    "3. Arrive ten minutes early and bring a printed copy of your CV.\n\n"
    "Good luck with your interview, and remember to breathe! Remember to breathe and stay calm."
)
INTERVIEW_THOUGHTS = (
    f"{SELF} The user wants practical advice for a job interview. "
    "I should follow rules 3 (useful), 13 (stepwise)."
)
LOOP = INTERVIEW_TIPS + " Remember to breathe and stay calm." * 3 + " Remember to breathe and"
VACCINES = (
    "Vaccines train the immune system to recognise a germ before it can make you ill.\n\n"
    "Most vaccines contain a weakened or inactivated virus, or just one of its proteins. The "
    "immune system reacts by making antibodies and memory cells, which stay in the body for "
    "years. If the real germ arrives later, those memory cells recognise it and the body fights "
    "it off quickly, often before any symptoms appear. Some newer vaccines, such as the mRNA "
    "ones, give the body instructions to make the protein itself, and the"
)
VACCINES_KEPT = VACCINES[: VACCINES.index(" Some newer")]
VACCINE_THOUGHTS = (
    f"{SELF} The user asks how vaccines work, a science question I can explain. "
    "I should follow rules 8 (recall), 2 (accurate)."
)


def test_a_loop_is_trimmed_at_its_first_repeat() -> None:
    verdict = judge(answered(LOOP, INTERVIEW_THOUGHTS), "length", query=INTERVIEW)
    assert verdict.reason == "kept"
    assert verdict.fields["answer"] == INTERVIEW_TIPS
    assert verdict.fields["trimmed"] is True and verdict.fields["truncated"] is False
    _, drop = build(AlignedConfig(on_repeat="drop"))
    verdict = judge(answered(LOOP, INTERVIEW_THOUGHTS), "length", query=INTERVIEW, judge=drop)
    assert verdict.reason == "repeated_clause"


def test_a_loop_with_nothing_complete_before_it_is_a_repeat_drop() -> None:
    loop = (
        "Here are my tips for you: keep your plants watered daily, keep your plants "
        "watered daily, keep your plants watered daily, keep your plants watered daily"
    )
    _, keep_all = build(AlignedConfig(min_chars=0))
    for j in (JUDGE, keep_all):  # not "too_short", and never an empty answer kept
        assert judge(answered(loop, INTERVIEW_THOUGHTS), "length", INTERVIEW, j).reason == (
            "repeated_clause"
        )


def test_an_answer_cut_by_the_token_limit_keeps_its_complete_sentences() -> None:
    verdict = judge(answered(VACCINES, VACCINE_THOUGHTS), "length", query="How do vaccines work?")
    assert verdict.reason == "kept"
    assert verdict.fields["answer"] == VACCINES_KEPT
    assert verdict.fields["truncated"] is True and verdict.fields["trimmed"] is False
    _, drop = build(AlignedConfig(on_truncated="drop"))
    verdict = judge(answered(VACCINES, VACCINE_THOUGHTS), "length", "How do vaccines work?", drop)
    assert verdict.reason == "truncated"


def test_an_answer_that_ended_by_itself_is_not_truncated() -> None:
    verdict = judge(answered(VACCINES_KEPT, VACCINE_THOUGHTS), "stop", "How do vaccines work?")
    assert verdict.kept and verdict.fields["truncated"] is False
    verdict = judge(answered(VACCINES_KEPT, VACCINE_THOUGHTS), "length", "How do vaccines work?")
    assert verdict.kept and verdict.fields["truncated"] is True  # the limit stopped it


def test_truncation_drops_an_unfinished_code_block_and_list_line() -> None:
    code = (
        "Slicing with a step of -1 walks the string from its end to its start, which is the "
        "shortest way to reverse a string in Python:\n\n"
        "```python\ndef reverse(text: str) -> str:\n    return text[::-1]\n```"
    )
    loop = '\n\nA loop shows each step:\n\n```python\ndef reverse_loop(text):\n    out = ""\n'
    assert complete_prefix(code + loop + "    for ch in te") == code
    plants = (
        "A few easy houseplants for a dark flat:\n\n"
        "- Snake plant: survives low light and rare watering\n"
        "- ZZ plant: glossy leaves, almost impossible to kill\n"
        "- Pothos: trails nicely from a shelf and droops when it is thirsty"
    )
    assert complete_prefix(plants + "\n- Cast iron plant: as tough as its name, and it gro") == (
        plants
    )
    steps = "Boil the pasta:\n1. Salt the water.\n2. Add the pasta\n3. Stir"
    assert complete_prefix(steps) == "Boil the pasta:\n1. Salt the water.\n2. Add the pasta"
    sleep = (
        "Good sleep comes from steady habits more than from any single trick:\n\n"
        "1. **Keep a regular schedule.** Go to bed and get up at the same time every day.\n"
        "2. **Make the bedroom dark and cool.** Around 18 °C suits most people."
    )
    assert complete_prefix(f"{sleep}\n\nIf it lasts for weeks, e.g. you wake at 3 a.m. and") == (
        sleep
    )


def test_short_complete_answers_are_dropped_unless_min_chars_is_0() -> None:
    short = answered("Canberra is the capital of Australia, not Sydney.")
    assert judge(short, query="Capital of Australia?").reason == "too_short"
    _, any_length = build(AlignedConfig(min_chars=0))
    assert judge(short, query="Capital of Australia?", judge=any_length).reason == "kept"


# -- copies of the exemplars and of the model's own thoughts ---------------------------------------
TIMES = "What is 17 times 23?"
TIMES_ANALYSIS = (
    "The user asks me to multiply 17 by 23, which is simple arithmetic I can check. "
    "I should follow rules 11 (numeric), 3 (useful)."
)
TIMES_THOUGHTS = f"{SELF} {TIMES_ANALYSIS}"
FIBONACCI = PROMPT.exemplar_turns()[2][2]
FIBONACCI_CODE = FIBONACCI[FIBONACCI.index("```") : FIBONACCI.rindex("```") + 3]
LEAKS = {
    "thoughts repeated as the answer": (TIMES, TIMES_ANALYSIS, OWN_THOUGHTS),
    "thoughts repeated with a few words changed": (
        TIMES,
        "The user is asking me to multiply 17 by 23, which is simple arithmetic that I can "
        "check. I should follow rules 11 and 3.",
        OWN_THOUGHTS,
    ),
    "the weather answer for a sum": (TIMES, EX_ANSWER, "exemplar 4 answer: real-time data"),
    "the weather answer with another city": (
        TIMES,
        EX_ANSWER.replace("Lisbon", "Porto"),
        "exemplar 4 answer: real-time data",
    ),
    "the header's description of the thoughts": (
        TIMES,
        "Before every reply, Kestrel thinks privately: it describes itself, sums up the request "
        "in one sentence and names the rules below that apply.",
        "header",
    ),
    # Gemma 3 270M: the thoughts run on into the answer, rule numbers and all
    "the rule citation inside the answer": (
        "Write a function that takes an integer and returns it in the range 0 to 100.",
        "I have no connection to live data, so I can't see the range of the integer. I should "
        "follow rules 11 (accurate), 10 (recall), 9 (stepwise).",
        RULE_CITATION,
    ),
    "the Fibonacci code for interview tips": (
        INTERVIEW,
        f"Sure, here you go:\n{FIBONACCI_CODE}",
        "exemplar 3 answer: coding task",
    ),
}


@pytest.mark.parametrize("name", list(LEAKS))
def test_copies_are_dropped_and_name_what_they_copy(name: str) -> None:
    query, answer, source = LEAKS[name]
    verdict = judge(answered(answer, TIMES_THOUGHTS), query=query)
    assert verdict.reason == "leaked_exemplar"
    assert verdict.fields == {"leak_source": source}


# Good answers that share short phrases with the exemplars ("a weather app", "in linear time",
# "Could you add some context").
SHARED_PHRASES = {
    "Will it snow in Oslo this weekend?": (
        "I can't look up forecasts, because I have no live data, so I can't say whether it "
        "will snow in Oslo this weekend. A weather app or the Norwegian Meteorological "
        "Institute's site will have an up-to-date forecast. Oslo often gets snow from December "
        "to March."
    ),
    "Write a Python function that checks whether a list is sorted.": (
        "This version compares each item with the next one, so it runs in linear time and stops "
        "at the first pair that is out of order:\n```python\ndef is_sorted(items: list) -> bool:"
        "\n    return all(a <= b for a, b in zip(items, items[1:]))\n```\nAn empty list and a "
        "list with one item both count as sorted."
    ),
    "Which rules should I follow at a four-way stop?": (
        "At a four-way stop I should follow rules that every driver knows: the car that "
        "arrives first goes first, and when two arrive together the one on the right goes "
        "first. Always come to a full stop before the line."
    ),
    "What is Alex Chen known for?": (
        "I know of several people called Alex Chen, among them researchers, athletes and business "
        "people, so I can't tell which one you have in mind. Could you add some context, such as "
        "the country, the field they work in or where you saw the name?"
    ),
}


@pytest.mark.parametrize("query", list(SHARED_PHRASES))
def test_answers_sharing_common_phrases_with_exemplars_are_kept(query: str) -> None:
    thoughts = f"{SELF} The user asks: {query} I should follow rules 3 (useful), 7 (candid)."
    assert judge(answered(SHARED_PHRASES[query], thoughts), query=query).reason == "kept"


def test_stats_count_leaks_per_source_and_describe_kept_answers() -> None:
    results = [
        judge(answered(answer, TIMES_THOUGHTS), query=query) for query, answer, _ in LEAKS.values()
    ]
    results += [
        judge(answered(LOOP, INTERVIEW_THOUGHTS), "length", query=INTERVIEW),
        judge(answered(VACCINES, VACCINE_THOUGHTS), "length", "How do vaccines work?"),
        judge(answered(NEUTRAL_ANSWER, f"{SELF} {LOOSE_THOUGHTS['numbers only'][0]}")),
        judge(answered(NEUTRAL_ANSWER, f"{SELF} {next(iter(LOOSE_THOUGHTS.values()))[0]}")),
    ]
    records = [{"source": "self_instruct", **v.fields} for v in results if v.kept]
    dropped = [{"reason": v.reason, **v.fields} for v in results if not v.kept]
    stats = summarize(records, dropped, SimpleNamespace(config=CFG))  # type: ignore[arg-type]
    assert stats["leak_sources"] == {
        OWN_THOUGHTS: 2,
        "exemplar 4 answer: real-time data": 2,
        "exemplar 3 answer: coding task": 1,
        "header": 1,
        RULE_CITATION: 1,
    }
    assert stats["exemplar_openings"] == {}  # none of the kept answers opens like one
    assert (stats["trimmed_share"], stats["truncated_share"], stats["misnamed_share"]) == (
        0.25,
        0.25,
        0.25,
    )
    chars = sorted(len(r["answer"]) for r in records)
    assert stats["answer_chars"] == {
        "mean": round(sum(chars) / 4, 1), "p10": chars[0], "p50": chars[1], "p90": chars[3]
    }  # fmt: skip
    assert stats["refusals"]["by_source"] == {"self_instruct": {"prompts": 4, "refused": 0}}


def test_report_shows_stage_2_answer_stats(tmp_path: Path) -> None:
    stats = {
        "trimmed_share": 0.25, "truncated_share": 0.5, "misnamed_share": 0.125,
        "answer_chars": {"mean": 412.5, "p10": 170, "p50": 390, "p90": 700},
        "refusals": {"by_source": {"self_instruct": {"prompts": 10, "refused": 1},
                                   "tgrt": {"prompts": 4, "refused": 3}},
                     "by_type": {"legal advice": {"prompts": 4, "refused": 3}}},
        "leak_sources": {"exemplar 4 answer: real-time data": 2, OWN_THOUGHTS: 1},
    }  # fmt: skip
    entry = {"status": "complete", "counts": {"in": 14, "out": 8, "dropped": 6}, "stats": stats}
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": {"aligned": entry}}))
    page = write_report(tmp_path).read_text()
    section = page[page.index("<h2>Stage 2 answers</h2>") :]
    for shown in (
        "25.0%",
        "50.0%",
        "12.5%",
        "412.5, 170, 390, 700",
        "tgrt: 3/4",
        "legal advice: 3/4",
        "exemplar 4 answer: real-time data: 2",
        "own thoughts: 1",
    ):
        assert shown in section, shown  # fmt: skip


def test_answers_opening_like_an_exemplar_are_counted_not_dropped() -> None:
    """Gemma 3 270M opens most answers with the real-time exemplar's words, whatever the
    question; right for "What is the weather now?", a template elsewhere. Counted."""
    from selfalign.stages.aligned import exemplar_openings

    records = [
        {"answer": "I have no connection to live science services, so I cannot answer this "
                   "question. A magnet is a piece of iron that pulls other iron towards it."},
        {"answer": "I have no connection to live market data, so I can't give today's price."},
        {"answer": "Magnets attract iron because their atoms line up in one direction."},
    ]  # fmt: skip
    assert exemplar_openings(records, PROMPT) == {"exemplar 4 answer": 2}
