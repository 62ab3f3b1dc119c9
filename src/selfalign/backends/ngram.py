"""N-gram rules over the tokens a request has GENERATED (never its prompt), shared by
every backend: the hf backend applies them in-process, vLLM through ``vllm_logits``,
``vllm serve`` through the openai backend (``vllm_xargs``).

Why generated tokens only: counting the prompt would forbid the answer to quote the
question (editing, extraction, code fixes, translations that keep names).

- ``no_repeat_ngram_size`` N: a token that would complete an N-gram already generated gets
  -inf (transformers' ``NoRepeatNGramLogitsProcessor`` rule, over generated tokens only).
- ``ngram_penalties`` ((n, p), ...): a soft frequency penalty, as in the method's reference
  implementation. With ``g`` the generated tokens and ``c_n(t)`` the number of times the
  n-gram ``g[-(n-1):] + [t]`` occurs in ``g``, the logit of ``t`` is lowered by
  ``p * c_n(t)``, summed over the sizes. It is applied to raw logits (before temperature).
  Unlike the reference, every token can be penalized, not only word-initial pieces.
- Fenced code is left alone: while the generated text is inside an open ``` fence neither
  rule applies, and n-grams whose last token came while the fence was open are not
  counted (code repeats itself by nature). The fence is tracked from the text of each
  generated token: every run of three or more backticks opens or closes it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Per-request switches, in vLLM's ``SamplingParams.extra_args`` (``vllm_xargs`` over HTTP).
SIZE_ARG = "no_repeat_ngram_size"
PENALTIES_ARG = "ngram_penalties"  # "3:1.0,4:2.0": a string, which every vLLM version accepts

TokenText = Callable[[int], str]


def encode_penalties(penalties: Sequence[tuple[int, float]]) -> str:
    return ",".join(f"{n}:{p!r}" for n, p in penalties)


def decode_penalties(text: str) -> tuple[tuple[int, float], ...]:
    """The inverse of ``encode_penalties``; ValueError on anything else."""
    pairs = []
    for item in filter(None, text.split(",")):
        n, _, p = item.partition(":")
        pairs.append((int(n), float(p)))
    check_penalties(pairs)
    return tuple(pairs)


def check_penalties(penalties: Sequence[tuple[int, float]]) -> None:
    for n, p in penalties:
        if n < 1 or not (math.isfinite(p) and p >= 0):
            raise ValueError(f"n-gram penalty ({n}, {p}): n must be >= 1, the penalty >= 0")


def request_args(no_repeat: int, penalties: Sequence[tuple[int, float]]) -> dict[str, Any] | None:
    """The ``extra_args`` that switch the rules on for one request (None: no rules)."""
    args: dict[str, Any] = {}
    if no_repeat > 0:
        args[SIZE_ARG] = no_repeat
    if penalties:
        args[PENALTIES_ARG] = encode_penalties(penalties)
    return args or None


def rules_from_args(
    args: Mapping[str, Any] | None, token_text: TokenText | None
) -> NGramRules | None:
    """The rules a request's ``extra_args`` ask for, or None. ValueError when malformed."""
    args = args or {}
    size = args.get(SIZE_ARG, 0)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"{SIZE_ARG} must be a non-negative integer, got {size!r}")
    raw = args.get(PENALTIES_ARG, "")
    if not isinstance(raw, str):
        raise ValueError(f"{PENALTIES_ARG} must be a string like '3:1.0,4:2.0', got {raw!r}")
    penalties = decode_penalties(raw)
    if not size and not penalties:
        return None
    return NGramRules(size, penalties, token_text)


def token_texts(tokenizer: Any) -> TokenText:
    """Token id -> its decoded text (memoized): what the code-fence tracker reads."""
    cache: dict[int, str] = {}

    def text(token: int) -> str:
        if token not in cache:
            cache[token] = tokenizer.decode([token], skip_special_tokens=True)
        return cache[token]

    return text


class CodeFence:
    """Whether text fed piece by piece is inside a ``` block: each run of 3+ backticks
    toggles it. Pieces without a backtick cost one ``in`` test."""

    def __init__(self) -> None:
        self.open = False
        self._ticks = 0  # backticks at the end of the text so far

    def feed(self, text: str) -> None:
        if "`" not in text:
            if text:
                self._ticks = 0
            return
        for ch in text:
            if ch != "`":
                self._ticks = 0
                continue
            self._ticks += 1
            if self._ticks == 3:
                self.open = not self.open


class NGramRules:
    """One request's generated tokens and the rules above. ``feed`` appends generated
    tokens, ``adjustments`` says what to subtract from which logits next. Called as
    ``rules(prompt_ids, output_ids, logits)`` it is a per-request logits processor
    (vLLM's V1 model runner); the prompt is ignored."""

    def __init__(
        self,
        no_repeat: int = 0,
        penalties: Sequence[tuple[int, float]] = (),
        token_text: TokenText | None = None,
    ) -> None:
        if no_repeat < 0:
            raise ValueError("no_repeat_ngram_size must be >= 0")
        check_penalties(penalties)
        self.no_repeat = no_repeat
        self.penalties = tuple((n, p) for n, p in penalties if p > 0)
        self.token_text = token_text  # None: no fence tracking (token texts unknown)
        self.tokens: list[int] = []
        self.fence = CodeFence()
        sizes = {n for n, _ in self.penalties} | ({no_repeat} if no_repeat else set())
        # n -> (n-1 tokens) -> how often each next token completed that n-gram
        self.grams: dict[int, dict[tuple[int, ...], Counter[int]]] = {n: {} for n in sizes}

    def feed(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            in_code = self.fence.open
            self.tokens.append(token)
            if not in_code:
                for n, grams in self.grams.items():
                    if len(self.tokens) >= n:
                        key = tuple(self.tokens[len(self.tokens) - n : -1])
                        grams.setdefault(key, Counter())[token] += 1
            if self.token_text is not None:
                self.fence.feed(self.token_text(token))

    def _completions(self, n: int) -> Counter[int]:
        """Tokens that would complete an n-gram already counted, with its count."""
        if len(self.tokens) < n - 1:
            return Counter()
        return self.grams[n].get(tuple(self.tokens[len(self.tokens) - n + 1 :]), Counter())

    def adjustments(self) -> dict[int, float]:
        """Token -> amount to subtract from its logit (inf: banned)."""
        if self.fence.open:
            return {}
        out: dict[int, float] = {}
        for n, p in self.penalties:
            for token, count in self._completions(n).items():
                out[token] = out.get(token, 0.0) + p * count
        if self.no_repeat:
            for token in self._completions(self.no_repeat):
                out[token] = math.inf
        return out

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Subtract the adjustments from one row of logits, in place."""
        apply_rules(logits.unsqueeze(0), [(0, self)])
        return logits

    def __call__(
        self, prompt_ids: Sequence[int], output_ids: Sequence[int], logits: torch.Tensor
    ) -> torch.Tensor:
        self.feed(output_ids[len(self.tokens) :])
        return self.apply(logits)


def apply_rules(logits: torch.Tensor, rows: Iterable[tuple[int, NGramRules]]) -> torch.Tensor:
    """Subtract each ``(row, rules)``'s adjustments from that row of ``logits`` (2-D), in
    place and in one indexed update: one host-to-device copy a step, whatever the batch."""
    index_rows: list[int] = []
    index_cols: list[int] = []
    amounts: list[float] = []
    for row, rules in rows:
        adjust = rules.adjustments()
        index_rows += [row] * len(adjust)
        index_cols += adjust
        amounts += adjust.values()
    if amounts:
        import torch  # here: the openai backend reads this module's request arguments

        where = torch.tensor([index_rows, index_cols], device=logits.device)
        values = torch.tensor(amounts, dtype=logits.dtype, device=logits.device)
        logits.index_put_((where[0], where[1]), values.neg_(), accumulate=True)
    return logits
