"""The generation backend interface every stage talks to.

A backend turns ``GenerationRequest``s into ``GenerationResult``s and, where it can,
scores continuations (summed log-likelihood). Requests carry an optional shared
``prefix`` kept apart from the per-request ``prompt`` so that backends can reuse the
prefix's KV cache: the model sees the tokens of ``prefix + prompt`` tokenized as one text
(exactly what a plain ``generate`` on the joined string sees); the cached part is the run
of those tokens that the prefix alone tokenizes to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    # Text -> additive bias on the *first token* of that text (e.g. {"Sorry": -100}).
    logit_bias: dict[str, float] = field(default_factory=dict)
    repetition_penalty: float = 1.0
    # N-gram rules over the GENERATED tokens only (see ``ngram``; fenced code is exempt):
    # a token completing an N-gram already generated is banned ...
    no_repeat_ngram_size: int = 0
    # ... and, per (n, p), a token's logit drops by p times the number of times the
    # n-gram it would complete was already generated (3- and 4-grams in the reference).
    ngram_penalties: tuple[tuple[int, float], ...] = ()


def first_token_bias(
    logit_bias: dict[str, float], encode: Callable[[str], list[int]]
) -> dict[int, float]:
    """Text -> bias on the first token of that text, as every backend applies it
    (texts sharing a first token add up; a text with no tokens biases nothing)."""
    bias: dict[int, float] = {}
    for text, value in logit_bias.items():
        ids = encode(text)
        if ids:
            bias[ids[0]] = bias.get(ids[0], 0.0) + value
    return bias


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first stop string (the stop string itself is not kept)."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(cuts)] if cuts else text


@dataclass(frozen=True)
class GenerationRequest:
    """One completion. ``seed`` makes sampling reproducible regardless of batching."""

    prompt: str
    prefix: str = ""
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    # Chat requests (judges): when set, the backend formats them with the model's chat
    # template (or the server's chat endpoint) and ignores prefix/prompt.
    messages: tuple[dict[str, str], ...] | None = None


@dataclass
class GenerationResult:
    text: str
    finish_reason: Literal["stop", "length", "error"] = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # set when the request failed after all retries


@dataclass(frozen=True)
class ScoreRequest:
    """log P(continuation | context), lm-evaluation-harness conventions."""

    context: str
    continuation: str


@dataclass
class BackendStats:
    """Counters a stage copies into the manifest."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_tokens: int = 0  # tokens actually run through the model as prompt
    requests: int = 0
    retries: int = 0
    failures: int = 0
    retry_reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


class Backend(ABC):
    """``generate`` and ``score``; subclasses declare what they can do."""

    name: str = "base"
    can_score: bool = False

    def __init__(self) -> None:
        self.stats = BackendStats()

    @abstractmethod
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Results in request order. Never raises for one bad request: sets ``error``."""

    def score(self, requests: list[ScoreRequest]) -> list[float]:
        """Summed log-likelihood of each continuation given its context."""
        raise NotImplementedError(f"the {self.name} backend cannot score continuations")

    def score_details(self, requests: list[ScoreRequest]) -> list[tuple[float, bool | None]]:
        """``score`` plus whether greedy decoding would write each continuation
        (lm-evaluation-harness's ``is_greedy``); None where the backend cannot tell."""
        return [(value, None) for value in self.score(requests)]

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release engines, connections, GPU memory."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
