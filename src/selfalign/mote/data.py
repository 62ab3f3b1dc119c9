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
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from selfalign.chat_format import render_prompt
from selfalign.errors import InputError
from selfalign.mote.masking import additive_mask, step_position_ids, step_visibility
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


class StepCollator:
    """Right-pads examples and builds the 4D mask, positions, labels and routing.

    Per example and epoch, two seeded draws: step skipping (probability ``skip_prob``,
    for skippable examples) and the expert for its question tokens. They depend only
    on (seed, epoch, example index), so a resumed run repeats them exactly; the
    trainer sets ``epoch``. ``with_step_ids=False`` drops the routing (plain LoRA).
    """

    def __init__(
        self,
        pad_token_id: int,
        *,
        skip_prob: float = 0.0,
        seed: int = 0,
        with_step_ids: bool = True,
        mask_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.pad_token_id = pad_token_id
        self.skip_prob = skip_prob
        self.seed = seed
        self.epoch = 0
        self.with_step_ids = with_step_ids
        self.mask_dtype = mask_dtype

    def draws(self, index: int) -> tuple[float, int]:
        """(uniform for skipping, question expert) of one example this epoch."""
        gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) & (2**62 - 1))
        return float(torch.rand(1, generator=gen)), int(
            torch.randint(len(STEPS), (1,), generator=gen)
        )

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
        draws = [self.draws(f.get("index", i)) for i, f in enumerate(features)]
        skip = torch.tensor(
            [
                u < self.skip_prob and bool(f.get("skippable"))
                for (u, _), f in zip(draws, features, strict=True)
            ]
        )
        batch = {
            "input_ids": input_ids,
            "attention_mask": additive_mask(
                step_visibility(step_ids, valid, skip), self.mask_dtype
            ),
            "position_ids": step_position_ids(step_ids, valid, skip),
            "labels": labels,
        }
        if self.with_step_ids:
            batch["step_ids"] = step_ids
            batch["question_expert"] = torch.tensor([e for _, e in draws])
        return batch
