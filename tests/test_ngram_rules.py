"""The n-gram rules every backend shares (``backends.ngram``): generated tokens only, the
soft penalty's arithmetic, fenced code left alone. No vLLM needed: the hf backend and the
vLLM logits processor both run this code (hf end to end in test_backend_hf.py)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, NoRepeatNGramLogitsProcessor

from selfalign.backends.ngram import (
    CodeFence,
    NGramRules,
    request_args,
    rules_from_args,
    token_texts,
)

REFERENCE_PENALTIES = ((3, 1.0), (4, 2.0))


@pytest.mark.parametrize("size", [1, 2, 3, 6])
def test_no_repeat_bans_what_transformers_bans_over_the_generated_tokens(size: int) -> None:
    """As a vLLM per-request processor (prompt ids, output ids, logits): the prompt is
    ignored, the output is what transformers' processor would see."""
    rng = random.Random(size)
    vocab = 7  # a small vocabulary, so that n-grams repeat often
    prompt = [rng.randrange(vocab) for _ in range(14)]
    rules, oracle = NGramRules(size), NoRepeatNGramLogitsProcessor(size)
    output: list[int] = []
    for _ in range(40):
        want = torch.zeros(vocab)
        if output:
            want = oracle(torch.tensor([output]), torch.zeros(1, vocab))[0]
        got = rules(prompt, output, torch.zeros(vocab))
        assert torch.equal(got, want), (output, got, want)
        allowed = [t for t in range(vocab) if got[t] == 0] or list(range(vocab))
        output.append(rng.choice(allowed))


def test_the_prompt_never_counts_so_an_answer_may_quote_it() -> None:
    """ "Correct the spelling: ...": the answer repeats the prompt's sentence word for word."""
    sentence = [40, 41, 42, 43, 44, 45, 46, 47]
    prompt = [9, 8, 7, *sentence, 6]
    rules = NGramRules(6, REFERENCE_PENALTIES)
    output: list[int] = []
    for token in sentence:
        logits = rules(prompt, output, torch.zeros(64))
        assert torch.count_nonzero(logits) == 0, f"quoting was penalized at {len(output)}"
        output.append(token)


def test_penalty_is_p_times_the_count_of_each_completed_ngram() -> None:
    """Generated 5 6 7 5 6 7 5 6. Next token 7 would complete the 3-gram (5 6 7), generated
    twice, and the 4-gram (7 5 6 7), generated once: 1.0 * 2 + 2.0 * 1 = 4. Nothing else
    completes a generated 3- or 4-gram."""
    rules = NGramRules(penalties=REFERENCE_PENALTIES)
    rules.feed([5, 6, 7, 5, 6, 7, 5, 6])
    assert rules.adjustments() == {7: 4.0}
    logits = torch.arange(10, dtype=torch.float32)
    want = logits.clone()
    want[7] -= 4.0
    assert torch.equal(rules.apply(logits), want)
    # Then 5 would complete (6 7 5) twice and (5 6 7 5) twice: 1.0 * 2 + 2.0 * 2.
    rules.feed([7])
    assert rules.adjustments() == {5: 6.0}
    # With no_repeat_ngram_size as well, a banned token gets -inf whatever its penalty.
    both = NGramRules(3, REFERENCE_PENALTIES)
    both.feed([5, 6, 7, 5, 6])
    assert both.adjustments() == {7: math.inf}
    assert both.apply(torch.zeros(10))[7] == float("-inf")


def test_code_fence_toggles_on_runs_of_three_backticks_across_pieces() -> None:
    fence = CodeFence()
    for piece, is_open in [
        ("Use `len(x)` for that.\n", False),  # inline code: one backtick
        ("``", False),
        ("`python\n", True),  # a fence split over two tokens
        ("print('``')\n", True),  # two backticks inside code
        ("", True),  # a special token decodes to nothing: the run is not broken
        ("````\n", False),  # four backticks close once
        ("Done.", False),
    ]:
        fence.feed(piece)
        assert fence.open is is_open, piece


ANSWER = """\
To print the first three numbers twice, repeat the loop:
```python
for i in range(3):
    print(i)
for i in range(3):
    print(i)
```
The loop prints each number, and then the loop prints each number again."""


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    return AutoTokenizer.from_pretrained(tiny_model)


def _penalized_steps(tokenizer, ids: list[int], with_texts: bool) -> list[str]:
    """The text generated so far at every step where some logit would be lowered."""
    rules = NGramRules(penalties=REFERENCE_PENALTIES, token_text=None)
    if with_texts:
        rules.token_text = token_texts(tokenizer)
    steps = []
    for i, token in enumerate(ids):
        if rules.adjustments():
            steps.append(tokenizer.decode(ids[:i]))
        rules.feed([token])
    return steps


def test_fenced_code_is_exempt_with_real_token_texts(tokenizer) -> None:
    ids = tokenizer(ANSWER, add_special_tokens=False).input_ids
    code_end = ANSWER.index("```\nThe")
    blind = _penalized_steps(tokenizer, ids, with_texts=False)
    assert any("```python" in s and len(s) < code_end for s in blind), "the repeated loop"
    steps = _penalized_steps(tokenizer, ids, with_texts=True)
    assert steps, "the prose repeats itself after the code block"
    for text in steps:
        assert text.count("```") % 2 == 0, f"penalized inside the code block: {text!r}"
        assert len(text) > code_end


def test_ngrams_generated_inside_code_are_not_counted() -> None:
    texts = {1: "```", 2: "x", 3: " =", 4: " 1", 5: "\n", 6: "Then"}
    counted, exempt = (
        NGramRules(penalties=REFERENCE_PENALTIES),
        NGramRules(penalties=REFERENCE_PENALTIES, token_text=texts.__getitem__),
    )
    code = [1, 5, 2, 3, 4, 5, 2, 3, 4, 5, 1, 5]  # ```\nx = 1\nx = 1\n```\n
    for rules in (counted, exempt):
        rules.feed([*code, 6, 2, 3])  # "Then x =": prose quoting the code
    assert counted.adjustments() == {4: 2.0}  # the 3-gram (x = 1), twice in the code
    assert exempt.adjustments() == {}
    assert not exempt.fence.open


def test_request_args_round_trip_and_bad_args_are_value_errors() -> None:
    assert request_args(0, ()) is None
    args = request_args(6, REFERENCE_PENALTIES)
    assert args == {"no_repeat_ngram_size": 6, "ngram_penalties": "3:1.0,4:2.0"}
    rules = rules_from_args(args, None)
    assert rules is not None
    assert (rules.no_repeat, rules.penalties) == (6, REFERENCE_PENALTIES)
    assert rules_from_args({}, None) is None
    for bad in (
        {"no_repeat_ngram_size": -1},
        {"no_repeat_ngram_size": "6"},
        {"ngram_penalties": "3=1.0"},
        {"ngram_penalties": "0:1.0"},
        {"ngram_penalties": "3:-1"},
        {"ngram_penalties": [3, 1.0]},
    ):
        with pytest.raises(ValueError):
            rules_from_args(bad, None)
