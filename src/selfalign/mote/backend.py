"""A MoTE model directory behind the ``Backend`` interface (for benchmarks run through it).

``generate``: the model writes its chain in adaptive mode (it chooses which steps to
write) and the answer step's text is the completion, cut at the request's stop strings;
``max_new_tokens`` bounds the whole chain. The prompt (``prefix + prompt``) is the user's
question in the model's chat format, as ``selfalign chat`` gives it.

``score``: log-likelihoods of the plain text with every token routed to the answer
expert (+ shared): the model that ``export_merged_step(..., "answer")`` writes out, so a
score here equals one through the hf backend on that export. The plain-LoRA baseline
(one adapter, no routing) is scored as it is. Scoring reuses ``HFBackend``'s batching and
prefix cache.
"""

from __future__ import annotations

from itertools import groupby
from pathlib import Path
from typing import Any

import torch

from selfalign.backends.base import (
    Backend,
    GenerationRequest,
    GenerationResult,
    ScoreRequest,
    cut_at_stop,
)
from selfalign.backends.hf import HFBackend, resolve_device, resolve_dtype
from selfalign.mote.chat import history_question
from selfalign.mote.generate import StepOutput, generate_steps
from selfalign.mote.model import load_mote, mote_state
from selfalign.text.steps import ANSWER


class _AnswerRouted:
    """The MoTE model called with every token in the answer step (``step_ids=``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        return self._model(*args, step_ids=torch.full_like(input_ids, ANSWER), **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class MoteBackend(Backend):
    name = "mote"
    can_score = True

    def __init__(
        self, path: str | Path, *, batch_size: int = 8, dtype: str = "auto", device: str = "auto"
    ) -> None:
        super().__init__()
        dev = resolve_device(device)
        self.model, self.tokenizer = load_mote(path, dtype=resolve_dtype(dtype, dev), device=dev)
        self.batch_size = batch_size
        routed = _AnswerRouted(self.model) if mote_state(self.model).method == "mote" else None
        self._scorer = HFBackend(
            path, model=routed or self.model, tokenizer=self.tokenizer, batch_size=batch_size
        )
        self._scorer.stats = self.stats  # one set of counters

    def encode(self, text: str) -> list[int]:
        return self._scorer.encode(text)

    def score(self, requests: list[ScoreRequest]) -> list[float]:
        return self._scorer.score(requests)

    def score_details(self, requests: list[ScoreRequest]) -> list[tuple[float, bool | None]]:
        return self._scorer.score_details(requests)

    def score_ids(
        self, pairs: list[tuple[list[int], list[int]]]
    ) -> list[tuple[float, bool | None]]:
        return self._scorer.score_ids(pairs)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        asked = [_question(r) for r in requests]  # (question, system)
        results: list[GenerationResult | None] = [None] * len(requests)

        def key(i: int) -> tuple[str, str]:
            return repr(requests[i].params), repr(asked[i][1])

        for _, group in groupby(sorted(range(len(requests)), key=key), key=key):
            group = list(group)
            params, system = requests[group[0]].params, asked[group[0]][1]
            if params.temperature > 0:  # each request's own seed: one chain at a time
                batches = [([i], requests[i].seed) for i in group]
            else:
                batches = [(group, 0)]
            for batch, seed in batches:
                outs = generate_steps(
                    self.model, self.tokenizer, [asked[i][0] for i in batch], mode="adaptive",
                    system=system, max_new_tokens=params.max_new_tokens,
                    temperature=params.temperature, top_p=params.top_p, seed=seed,
                    batch_size=self.batch_size,
                )  # fmt: skip
                for i, out in zip(batch, outs, strict=True):
                    results[i] = _result(out, params.stop)
        self.stats.requests += len(requests)
        self.stats.completion_tokens += sum(r.completion_tokens for r in results if r)
        return results  # type: ignore[return-value]


def _question(request: GenerationRequest) -> tuple[str, str | None]:
    """(question, system override): chat messages as ``selfalign chat`` turns them into
    one question; otherwise the text is the question under the model's own system."""
    if request.messages is not None:
        return history_question(list(request.messages))
    return request.prefix + request.prompt, None


def _result(out: StepOutput, stop: tuple[str, ...]) -> GenerationResult:
    return GenerationResult(
        text=cut_at_stop(out.answer or "", stop),
        finish_reason="stop" if out.finished else "length",
        completion_tokens=len(out.token_ids),
    )
