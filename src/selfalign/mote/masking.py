"""Attention masks and position ids for packed chains, with step skipping.

In a packed chain every token normally sees all earlier tokens. Step skipping hides some
earlier steps from a later step: ``hidden[b, s, t]`` (indexed by step id) says that the
tokens of step ``s`` in row ``b`` do not see the tokens of step ``t``. The question is
never hidden, and ``hidden`` relates different steps only. A token's position is the
number of tokens it sees before itself, so each step is laid out as if the steps hidden
from it were absent: its view equals the shorter sequence (question, the steps it sees,
the step), which is what answering with those steps skipped looks like at inference.
That holds when the hidden sets agree with each other (``mote.data.draw_hidden_steps``
draws them so).
"""

from __future__ import annotations

import torch

from selfalign.text.steps import QUESTION, STEPS


def no_hidden_steps(batch: int) -> torch.Tensor:
    """Boolean (batch, n, n) with nothing hidden, n = number of step ids (question too)."""
    return torch.zeros(batch, len(STEPS) + 1, len(STEPS) + 1, dtype=torch.bool)


def step_visibility(
    step_ids: torch.Tensor, padding_mask: torch.Tensor, hidden: torch.Tensor
) -> torch.Tensor:
    """Boolean (batch, 1, q, k): may query q attend to key k.

    Causal, padding hidden; a query of step ``s`` also loses the keys of every step ``t``
    with ``hidden[b, s, t]``, except question keys. Every token sees itself, so no row is
    empty (pads included).
    """
    seq = step_ids.shape[1]
    device = step_ids.device
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    visible = causal[None] & padding_mask.bool()[:, None, :]
    for step, query_hides in _hides(step_ids, hidden):
        visible &= ~(query_hides[:, :, None] & (step_ids == step)[:, None, :])
    visible = visible | torch.eye(seq, dtype=torch.bool, device=device)[None]
    return visible[:, None]


def _hides(step_ids: torch.Tensor, hidden: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """Per step id but the question's: (step, boolean (batch, seq): does the token's step
    hide it). A loop over the few steps keeps every tensor at most (batch, seq, seq)."""
    hidden = hidden.bool().to(step_ids.device)
    steps = [s for s in range(hidden.shape[-1]) if s != QUESTION]
    return [(s, hidden[:, :, s].gather(1, step_ids)) for s in steps]


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean visibility -> additive float mask (0 where visible, dtype min elsewhere)."""
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)


def step_position_ids(
    step_ids: torch.Tensor, padding_mask: torch.Tensor, hidden: torch.Tensor
) -> torch.Tensor:
    """Each token's position is the number of tokens it sees before itself (its position
    in the sequence without the steps hidden from it): 0.. along the (right-padded) row,
    less the tokens of hidden steps up to it. Pads keep the last valid position."""
    valid = padding_mask.bool()
    positions = valid.long().cumsum(1) - 1
    for step, query_hides in _hides(step_ids, hidden):
        so_far = ((step_ids == step) & valid).long().cumsum(1)
        positions = positions - torch.where(query_hides & valid, so_far, 0)
    return positions.clamp(min=0)
