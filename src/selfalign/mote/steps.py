"""Reasoning steps, their delimiter tokens, and per-token step ids.

A chain is written as one sequence::

    <question prompt><|analysis|>...<|/analysis|><|guidance|>...<|/guidance|><|answer|>...<|/answer|></s>

Membership rule (used by training, routing and decoding alike): a token belongs to the
step of the most recent start delimiter at or before it, so both delimiters of a step
belong to that step, and so does the EOS after the answer. Tokens before the first start
delimiter are question tokens. The end delimiters do not change the current step; they
only mark where a step stops (the model predicts them, decoding stops on them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfalign.text.steps import QUESTION, STEPS, step_token_strings

# Used to initialise the new embedding rows: a start/end token begins as the mean
# embedding of these words instead of a random vector.
_TOKEN_HINTS = {
    "analysis": ("analysis", "end of analysis"),
    "guidance": ("guidance", "end of guidance"),
    "answer": ("answer", "end of answer"),
}


@dataclass(frozen=True)
class StepTokens:
    """Token ids of the delimiters, in ``STEPS`` order."""

    start: tuple[int, ...]
    end: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer) -> StepTokens:
        ids = tokenizer.convert_tokens_to_ids(step_token_strings())
        unk = getattr(tokenizer, "unk_token_id", None)
        if any(i is None or i == unk for i in ids):
            raise ValueError("tokenizer lacks the step tokens: call add_step_tokens first")
        return cls(start=tuple(ids[0::2]), end=tuple(ids[1::2]))

    @property
    def all(self) -> tuple[int, ...]:
        return self.start + self.end

    def step_of_start(self, token_id: int) -> int | None:
        """Step id started by this token, or None."""
        return self.start.index(token_id) + 1 if token_id in self.start else None

    def step_of_end(self, token_id: int) -> int | None:
        return self.end.index(token_id) + 1 if token_id in self.end else None


def add_step_tokens(model, tokenizer) -> StepTokens:
    """Add the six delimiters as special tokens and resize the embeddings (idempotent).

    New rows start from the mean embedding of a short hint ("analysis", "end of analysis",
    ...) in the input embeddings and, if untied, in the output layer.
    """
    wanted = step_token_strings()
    missing = [t for t in wanted if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    tokens = StepTokens.from_tokenizer(tokenizer)
    if missing:
        _init_new_rows(model, tokenizer, tokens, set(tokenizer.convert_tokens_to_ids(missing)))
    return tokens


@torch.no_grad()
def _init_new_rows(model, tokenizer, tokens: StepTokens, new_ids: set[int]) -> None:
    emb_in = model.get_input_embeddings().weight
    emb_out = model.get_output_embeddings()
    out_w = None if emb_out is None or emb_out.weight is emb_in else emb_out.weight
    for step_index, step in enumerate(STEPS):
        for token_id, hint in zip(
            (tokens.start[step_index], tokens.end[step_index]), _TOKEN_HINTS[step], strict=True
        ):
            if token_id not in new_ids:
                continue
            hint_ids = tokenizer(hint, add_special_tokens=False).input_ids
            emb_in[token_id] = emb_in[hint_ids].mean(0)
            if out_w is not None:
                out_w[token_id] = out_w[hint_ids].mean(0)


def step_ids_from_input_ids(
    input_ids: torch.Tensor, tokens: StepTokens, initial: torch.Tensor | int = QUESTION
) -> torch.Tensor:
    """Step id of every token, (batch, seq) long.

    ``initial`` is the step in force before the first token (per row or one int): the
    step of the last token already in the KV cache when decoding incrementally.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    batch, seq = input_ids.shape
    device = input_ids.device
    started = torch.zeros_like(input_ids)
    for i, token_id in enumerate(tokens.start):
        started = torch.where(input_ids == token_id, i + 1, started)
    positions = torch.arange(seq, device=device).expand(batch, seq)
    last_start = torch.where(started > 0, positions, -1).cummax(dim=1).values
    from_start = started.gather(1, last_start.clamp(min=0))
    init = torch.as_tensor(initial, device=device, dtype=input_ids.dtype)
    init = init.reshape(-1, 1).expand(batch, seq) if init.dim() else init.expand(batch, seq)
    return torch.where(last_start >= 0, from_start, init)
