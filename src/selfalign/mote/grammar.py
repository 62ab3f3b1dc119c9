"""The step grammar as a logits processor: what a chain may write next, for a whole batch.

A row's state is read from its own token ids (the last delimiter it wrote and how many
tokens followed it), so the processor keeps no state between calls and works on any
batch of rows, each in its own state:

- after the question, or after a step's end token: only start tokens of later steps
  (the answer comes last); with a ``plan`` (forced modes) the next planned start token
  is forced instead;
- inside a step: anything but a delimiter or EOS, or the step's own end token; once the
  step has ``max_step_tokens`` tokens, its end token is forced;
- after the answer's end token the row is finished (generate pads it): no constraint.

A forced token gets score 0 and everything else -inf; allowed tokens keep their score.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

from selfalign.mote.steps import StepTokens
from selfalign.text.steps import ANSWER, STEPS

# Rule table rows: ``done`` between steps (the last step written, 0 after the question),
# ``_STRIDE + s`` inside step s, ``2 * _STRIDE + s`` inside step s at its token cap.
_STRIDE = len(STEPS) + 1


class StepGrammar(LogitsProcessor):
    """Masks each row's next-token scores to what the step grammar allows."""

    def __init__(
        self,
        tokens: StepTokens,
        *,
        plan: Sequence[str] | None = None,
        eos_token_id: int | None = None,
        max_step_tokens: int | None = None,
    ) -> None:
        if plan is not None and (not plan or plan[-1] != "answer"):
            raise ValueError(f"a plan must end with the answer, got {plan!r}")
        self.tokens = tokens
        self.plan = None if plan is None else [STEPS.index(s) + 1 for s in plan]
        self.eos_token_id = eos_token_id
        self.max_step_tokens = max_step_tokens
        self._tables: dict[tuple[int, torch.device], tuple[torch.Tensor, ...]] = {}

    def rules(self, input_ids: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(allowed (batch, vocab) bool, forced (batch,) bool) for each row's next token.

        ``forced`` marks rows whose next token is fixed by the grammar (a planned start
        token, or an end token at the cap), not chosen by the model."""
        _, allowed, forced = self._tables_for(vocab, input_ids.device)
        rule = self._rule(input_ids, vocab)
        return allowed[rule], forced[rule]

    def chooses(self, input_ids: torch.Tensor, vocab: int) -> torch.Tensor:
        """(batch,) bool: rows whose next token the model chooses (neither forced nor
        finished), i.e. the rows a sampler draws for."""
        _, _, forced = self._tables_for(vocab, input_ids.device)
        rule = self._rule(input_ids, vocab)
        return ~forced[rule] & (rule != ANSWER)

    def _rule(self, input_ids: torch.Tensor, vocab: int) -> torch.Tensor:
        """Each row's rule table row, from the last delimiter it wrote."""
        codes, _, _ = self._tables_for(vocab, input_ids.device)
        code = codes[input_ids]  # +s: start of step s, -s: its end, 0: other tokens
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = torch.where(code != 0, positions, -1).amax(dim=1)
        last_code = code.gather(1, last.clamp(min=0)[:, None])[:, 0]
        last_code = torch.where(last >= 0, last_code, 0)
        rule = torch.where(last_code < 0, -last_code, 0)  # between steps: the last step done
        inside = last_code > 0
        rule = torch.where(inside, last_code + _STRIDE, rule)
        if self.max_step_tokens is not None:
            capped = inside & (input_ids.shape[1] - 1 - last >= self.max_step_tokens)
            rule = torch.where(capped, last_code + 2 * _STRIDE, rule)
        return rule

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed, forced = self.rules(input_ids, scores.shape[-1])
        masked = scores.masked_fill(~allowed, float("-inf"))
        return torch.where(forced[:, None] & allowed, 0.0, masked)

    def _tables_for(self, vocab: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        key = (vocab, device)
        if key not in self._tables:
            self._tables[key] = tuple(t.to(device) for t in self._build(vocab))
        return self._tables[key]

    def _build(self, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        start, end = self.tokens.start, self.tokens.end
        codes = torch.zeros(vocab, dtype=torch.long)
        codes[list(start)] = torch.arange(1, len(STEPS) + 1)
        codes[list(end)] = -torch.arange(1, len(STEPS) + 1)
        allowed = torch.zeros(3 * _STRIDE, vocab, dtype=torch.bool)
        forced = torch.zeros(3 * _STRIDE, dtype=torch.bool)
        for done in range(len(STEPS) + 1):  # between steps, ``done`` the last step written
            later = [
                s for s in range(done + 1, len(STEPS) + 1) if self.plan is None or s in self.plan
            ]
            if done == ANSWER or not later:  # finished: generate pads the row
                allowed[done] = True
            elif self.plan is None:
                allowed[done, [start[s - 1] for s in later]] = True
            else:
                allowed[done, start[later[0] - 1]] = forced[done] = True
        content = torch.ones(vocab, dtype=torch.bool)
        content[list(self.tokens.all)] = False
        if self.eos_token_id is not None:
            content[self.eos_token_id] = False
        for step in range(1, len(STEPS) + 1):
            allowed[_STRIDE + step] = content
            allowed[_STRIDE + step, end[step - 1]] = True
            allowed[2 * _STRIDE + step, end[step - 1]] = forced[2 * _STRIDE + step] = True
        allowed[_STRIDE] = allowed[2 * _STRIDE] = True  # unused (no step 0)
        return codes, allowed, forced
