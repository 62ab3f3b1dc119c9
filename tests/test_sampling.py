"""The seeded top-p draw (``SeededSampler``): the nucleus it keeps is transformers' own, its
draws follow the nucleus's renormalised probabilities, and forced rows pass untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TopPLogitsWarper

from selfalign.backends.sampling import SeededSampler, draw, nucleus

QUESTIONS = [
    "### User\nHow do I boil an egg?\n\n### Assistant\n",
    "Write a short poem about the sea.",
    "The capital of France is",
    "List three prime numbers:",
]


def model_logits(model_dir: Path) -> torch.Tensor:
    """Next-token logits a real (tiny) model gives at the end of each question."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = []
    with torch.no_grad():
        for q in QUESTIONS:
            ids = tokenizer(q, return_tensors="pt").input_ids
            rows.append(model(ids).logits[0, -1])
    return torch.stack(rows)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_nucleus_is_transformers_top_p(
    pretrained_model: Path, varied_tiny_model: Path, temperature: float, top_p: float
) -> None:
    """Peaked logits (the pre-trained tiny model) and flat ones (the varied random model,
    at temperature 2 a nucleus of hundreds of tokens: ``k`` has to grow)."""
    logits = torch.cat([model_logits(pretrained_model), model_logits(varied_tiny_model)])
    logits = logits / temperature
    warped = TopPLogitsWarper(top_p)(None, logits.clone())
    weights, ids = nucleus(torch.softmax(logits, -1), top_p)
    for row in range(len(logits)):
        expected = set(torch.isfinite(warped[row]).nonzero().flatten().tolist())
        assert set(ids[row][weights[row] > 0].tolist()) == expected
    if temperature == 2.0 and top_p == 0.99:
        assert max(int((w > 0).sum()) for w in weights) > 64  # past the first k


def test_draws_follow_the_nucleus() -> None:
    """8,000 rows, each with its own generator, drawn once: the token frequencies are the
    nucleus's renormalised probabilities (0.5, 0.3, 0.15 over 0.95), the tail never."""
    probs = torch.tensor([[0.30, 0.05, 0.50, 0.15]]).expand(8000, -1)
    generators = [torch.Generator().manual_seed(s) for s in range(8000)]
    tokens = draw(probs, 0.9, generators)
    freq = torch.bincount(tokens, minlength=4).double() / len(tokens)
    expected = torch.tensor([0.30, 0.0, 0.50, 0.15], dtype=torch.float64) / 0.95
    assert (freq - expected).abs().max() < 0.015
    assert freq[1] == 0.0
    full = draw(probs, 1.0, generators)  # no top-p: the tail is drawn too
    assert (torch.bincount(full, minlength=4).double() / 8000 - probs[0]).abs().max() < 0.015


def test_forced_rows_pass_and_draws_are_per_row() -> None:
    """A row the caller does not let choose keeps its scores and uses no draw; a chosen
    row's token depends only on its own seed, not on the rows beside it."""
    scores = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 3))
    forced = SeededSampler([1, 2, 3], chooses=lambda ids, v: torch.tensor([True, False, True]))
    out = forced(torch.zeros((3, 1), dtype=torch.long), scores.clone())
    assert torch.equal(out[1], scores[1])
    alone = SeededSampler([3])(torch.zeros((1, 1), dtype=torch.long), scores[:1].clone())
    assert out[2].argmax() == alone[0].argmax()
    assert torch.isfinite(out[0]).sum() == 1 and torch.isfinite(out[2]).sum() == 1
