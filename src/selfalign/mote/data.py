"""Chains -> token sequences: packed (MoTE) and expanded (the multi-LoRA baseline).

A chain record is ``{"question": str, "analysis": str|None, "guidance": str|None,
"answer": str}`` (other keys are ignored). Packed: one sequence per chain, each token
routed to its step's expert, loss on every step token (delimiters and the final EOS
included, question excluded). Expanded: one sequence per (step, subset of the earlier
steps kept as context), all its tokens routed to that step's expert, loss on that step
only: 1, 3 or 7 sequences for a chain of 1, 2 or 3 steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from selfalign.chat_format import render_prompt
from selfalign.errors import InputError
from selfalign.mote.masking import (
    additive_mask,
    no_hidden_steps,
    step_position_ids,
    step_visibility,
)
from selfalign.mote.steps import StepTokens, step_ids_from_input_ids
from selfalign.text.steps import QUESTION, STEP_IDS, STEPS, strip_step_tokens
from selfalign.validation import describe_error, field_path

IGNORE = -100


class Chain(BaseModel):
    """One AlignCoT chain (what the data stage writes, one JSON object per line)."""

    model_config = ConfigDict(extra="ignore")

    question: str = Field(min_length=1)
    analysis: str | None = None
    guidance: str | None = None
    answer: str = Field(min_length=1)

    @property
    def steps(self) -> list[str]:
        return [s for s in STEPS if getattr(self, s)]


def parse_chains(
    records: Iterable[dict[str, Any]], *, file: str | Path | None = None
) -> list[Chain]:
    """Validate chain records; a bad one raises ``InputError`` naming line and field."""
    chains = []
    for line, record in enumerate(records, start=1):
        try:
            chains.append(Chain.model_validate(record))
        except ValidationError as exc:
            loc, msg = describe_error(exc)
            raise InputError(msg, file=file, line=line, field=field_path(loc) or None) from None
    return chains


def prompt_ids(tokenizer, question: str, system: str | None = None) -> list[int]:
    """Token ids of the question turn up to where the assistant starts writing.

    The tokenizer's chat template when it has one (so a model keeps its own format),
    selfalign's chat format otherwise. Delimiter strings in the texts are removed.
    """
    question = strip_step_tokens(question)
    system = strip_step_tokens(system) if system else system
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": question})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    text = render_prompt(system, question) if system else render_prompt("", question).lstrip()
    return tokenizer(text).input_ids


def step_segment(tokenizer, tokens: StepTokens, step: str, text: str) -> list[int]:
    """``<|step|> text <|/step|>`` (+ EOS after the answer) as token ids."""
    index = STEPS.index(step)
    ids = [
        tokens.start[index],
        *tokenizer(strip_step_tokens(text), add_special_tokens=False).input_ids,
        tokens.end[index],
    ]
    if step == "answer" and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


@dataclass
class Encoder:
    """Turns chains into training examples for one tokenizer and prompt format."""

    tokenizer: Any
    tokens: StepTokens
    system: str | None = None
    max_length: int = 2048
    truncated: int = 0  # examples cut to max_length so far

    def _segments(self, chain: Chain) -> tuple[list[int], dict[str, list[int]]]:
        prompt = prompt_ids(self.tokenizer, chain.question, self.system)
        steps = {
            s: step_segment(self.tokenizer, self.tokens, s, getattr(chain, s)) for s in chain.steps
        }
        return prompt, steps

    def _example(
        self, ids: list[int], route: list[int] | None, loss_step: int | None, skippable: bool
    ) -> dict:
        if len(ids) > self.max_length:
            self.truncated += 1
            ids = ids[: self.max_length]
        derived = step_ids_from_input_ids(torch.tensor([ids]), self.tokens)[0].tolist()
        labels = [
            t if (s != QUESTION if loss_step is None else s == loss_step) else IGNORE
            for t, s in zip(ids, derived, strict=True)
        ]
        return {
            "input_ids": ids,
            "step_ids": derived if route is None else route[: len(ids)],
            "labels": labels,
            "skippable": skippable,
        }

    def packed(self, chain: Chain) -> dict:
        """The chain as one sequence; step skipping may be drawn for it in the collator."""
        prompt, steps = self._segments(chain)
        ids = prompt + [t for s in chain.steps for t in steps[s]]
        return self._example(ids, None, None, skippable=len(chain.steps) > 1)

    def expanded(self, chain: Chain) -> list[dict]:
        """One sequence per step and per subset of the earlier steps kept as context."""
        prompt, steps = self._segments(chain)
        out = []
        for i, step in enumerate(chain.steps):
            earlier = chain.steps[:i]
            for k in range(len(earlier), -1, -1):
                for kept in combinations(earlier, k):
                    ids = prompt + [t for s in kept for t in steps[s]] + steps[step]
                    out.append(
                        self._example(ids, [STEP_IDS[step]] * len(ids), STEP_IDS[step], False)
                    )
        return out

    def dataset(self, chains: Sequence[Chain], *, expanded: bool = False) -> list[dict]:
        """Examples with an ``index`` (their position), which seeds their random draws."""
        if expanded:
            examples = [ex for c in chains for ex in self.expanded(c)]
        else:
            examples = [self.packed(c) for c in chains]
        return [{**ex, "index": i} for i, ex in enumerate(examples)]


class Draws(NamedTuple):
    """The random choices for one example in one epoch."""

    hidden: dict[str, frozenset[str]]  # per later step: the earlier steps it does not see
    question_expert: int  # expert index for the question tokens


def _hidden_options(
    steps: Sequence[str], i: int, hidden: dict[str, frozenset[str]]
) -> list[frozenset[str]]:
    """Non-empty sets of steps before ``steps[i]`` that it may hide, given the sets drawn
    for the steps before it.

    Hiding ``h`` is allowed when every earlier step ``t`` that stays visible hides exactly
    ``h``'s part before ``t``: the K/V of ``t`` were computed from what ``t`` saw, so the
    view of ``steps[i]`` is a real sequence (question, visible steps, step) only if ``t``
    saw the same context. Hiding all earlier steps always qualifies.
    """
    earlier = steps[:i]
    options = []
    for k in range(1, i + 1):
        for subset in combinations(earlier, k):
            h = frozenset(subset)
            if all(
                hidden.get(t, frozenset()) == h & frozenset(earlier[:j])
                for j, t in enumerate(earlier)
                if t not in h
            ):
                options.append(h)
    return options


def draw_hidden_steps(
    steps: Sequence[str], skip: bool, generator: torch.Generator
) -> dict[str, frozenset[str]]:
    """Per later step of a chain (``steps`` in chain order): the earlier steps it hides.

    Without ``skip`` nothing is hidden. With it every later step hides a non-empty set,
    drawn uniformly among the sets allowed by ``_hidden_options``, step by step in
    order. For the chains we have (at most analysis, guidance, answer) every non-empty
    set is allowed, so each later step hides each non-empty subset of its earlier steps
    with equal probability: guidance hides analysis; the answer hides {analysis},
    {guidance} or both. (Drawing the steps independently instead could let the answer
    see a guidance that did not see the analysis while it sees the analysis itself: a
    context that no expanded sequence, and no inference run, has.)
    """
    hidden: dict[str, frozenset[str]] = {}
    for i, step in enumerate(steps[1:], start=1):
        if not skip:
            hidden[step] = frozenset()
            continue
        options = _hidden_options(steps, i, hidden)
        hidden[step] = options[int(torch.randint(len(options), (1,), generator=generator))]
    return hidden


def example_draws(
    seed: int, epoch: int, index: int, steps: Sequence[str] = (), skip_prob: float = 0.0
) -> Draws:
    """The draws of example ``index`` in ``epoch``: a function of (seed, epoch, index) only.

    One uniform decides skipping for the whole example: below ``skip_prob`` every later
    step hides something, else none does. So each later step hides something with
    probability ``skip_prob`` and, when it does, hides each allowed non-empty subset of
    its earlier steps with equal probability (``draw_hidden_steps``). Sharing the one
    uniform across steps keeps the hidden sets consistent. Each step's loss depends only
    on its own view, and each step's distribution of views is the one asked for, so the
    coupling changes only which views share an example, not the expected loss.
    ``steps`` are the steps of a skippable example in chain order (empty otherwise).
    """
    generator = torch.Generator().manual_seed(hash((seed, epoch, index)) & (2**62 - 1))
    uniform = float(torch.rand(1, generator=generator))
    question_expert = int(torch.randint(len(STEPS), (1,), generator=generator))
    hidden = draw_hidden_steps(steps, uniform < skip_prob, generator)
    return Draws(hidden, question_expert)


def hidden_matrix(hidden: dict[str, frozenset[str]]) -> torch.Tensor:
    """``{step: hidden steps}`` -> boolean (n, n) by step id, as ``step_visibility`` takes."""
    out = no_hidden_steps(1)[0]
    for step, earlier in hidden.items():
        for t in earlier:
            out[STEP_IDS[step], STEP_IDS[t]] = True
    return out


def example_steps(feature: dict) -> list[str]:
    """The steps of a skippable example in order of appearance (none if not skippable)."""
    if not feature.get("skippable"):
        return []
    ids = [s for s in dict.fromkeys(feature["step_ids"]) if s != QUESTION]
    return [STEPS[s - 1] for s in ids]


class StepCollator:
    """Right-pads examples and builds the 4D mask, positions, labels and routing.

    Per example and epoch, seeded draws (``example_draws``): which earlier steps each
    later step hides (step skipping with probability ``skip_prob``, for skippable
    examples) and the expert for its question tokens. They depend only on (seed, epoch,
    example index), so a resumed run repeats them exactly; the trainer sets ``epoch``.
    ``with_step_ids=False`` drops the routing (plain LoRA, the gated rows);
    ``with_token_mask`` passes which tokens are real (``token_mask``: the gated rows'
    auxiliary losses leave padding out, which the 4D mask cannot tell them).
    """

    def __init__(
        self,
        pad_token_id: int,
        *,
        skip_prob: float = 0.0,
        seed: int = 0,
        with_step_ids: bool = True,
        with_token_mask: bool = False,
        mask_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.pad_token_id = pad_token_id
        self.skip_prob = skip_prob
        self.seed = seed
        self.epoch = 0
        self.with_step_ids = with_step_ids
        self.with_token_mask = with_token_mask
        self.mask_dtype = mask_dtype

    def draws(self, index: int, steps: Sequence[str] = ()) -> Draws:
        """(hidden steps, question expert) of one example this epoch."""
        return example_draws(self.seed, self.epoch, index, steps, self.skip_prob)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor([f[key] + [value] * (length - len(f[key])) for f in features])

        input_ids = pad("input_ids", self.pad_token_id)
        labels = pad("labels", IGNORE)
        step_ids = pad("step_ids", QUESTION)
        valid = torch.tensor(
            [[1] * len(f["input_ids"]) + [0] * (length - len(f["input_ids"])) for f in features]
        )
        draws = [self.draws(f.get("index", i), example_steps(f)) for i, f in enumerate(features)]
        hidden = torch.stack([hidden_matrix(d.hidden) for d in draws])
        visible = step_visibility(step_ids, valid, hidden)
        batch = {
            "input_ids": input_ids,
            "attention_mask": additive_mask(visible, self.mask_dtype),
            "position_ids": step_position_ids(step_ids, valid, hidden),
            "labels": labels,
        }
        if self.with_step_ids:
            batch["step_ids"] = step_ids
            batch["question_expert"] = torch.tensor([d.question_expert for d in draws])
        if self.with_token_mask:
            batch["token_mask"] = valid.bool()
        return batch
