"""Attention masks and position ids for packed chains, with step skipping.

In a packed chain every token normally sees all earlier tokens. When step skipping is
drawn for a sequence, a token of a step sees the question and its own step only, never
an earlier step, and the step's positions restart right after the question. The
skipped view of each step is then exactly the sequence (question, that step) on its
own, which is what answering with steps skipped looks like at inference.
"""

from __future__ import annotations

import torch

from selfalign.text.steps import QUESTION


def step_visibility(
    step_ids: torch.Tensor, padding_mask: torch.Tensor, skip: torch.Tensor
) -> torch.Tensor:
    """Boolean (batch, 1, q, k): may query q attend to key k.

    Causal, padding hidden; rows with ``skip`` also hide keys of other steps unless they
    are question tokens. Every token sees itself, so no row is empty (pads included).
    """
    batch, seq = step_ids.shape
    device = step_ids.device
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    visible = causal[None] & padding_mask.bool()[:, None, :]
    same_step = step_ids[:, :, None] == step_ids[:, None, :]
    key_is_question = (step_ids == QUESTION)[:, None, :]
    skipped = ~(same_step | key_is_question) & skip.bool()[:, None, None]
    visible = visible & ~skipped
    visible = visible | torch.eye(seq, dtype=torch.bool, device=device)[None]
    return visible[:, None]


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean visibility -> additive float mask (0 where visible, dtype min elsewhere)."""
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)


def step_position_ids(
    step_ids: torch.Tensor, padding_mask: torch.Tensor, skip: torch.Tensor
) -> torch.Tensor:
    """Positions 0.. along each (right-padded) row; in skipped rows each step restarts
    after the question."""
    valid = padding_mask.bool()
    positions = valid.long().cumsum(1) - 1
    question_len = ((step_ids == QUESTION) & valid).sum(1, keepdim=True)
    restarted = positions.clone()
    for step in step_ids.unique().tolist():
        if step == QUESTION:
            continue
        in_step = (step_ids == step) & valid
        restarted = torch.where(in_step, question_len + in_step.long().cumsum(1) - 1, restarted)
    out = torch.where(skip.bool()[:, None], restarted, positions)
    return out.clamp(min=0)
