"""Token ids for requests, built the same way for every backend that tokenizes on our side.

The hf and vllm backends feed their model these ids, and the openai backend sends them
when it has the served model's tokenizer, so one request means one model input on all
of them. Works on any tokenizer object with transformers' interface; imports neither
torch nor transformers.
"""

from __future__ import annotations

from typing import Any

from selfalign.backends.base import GenerationRequest
from selfalign.chat_format import CHAT_TEMPLATE


class RequestTokenizer:
    """A tokenizer plus the conventions every backend shares: no special tokens inside
    texts, the tokenizer's own leading special tokens (``head_ids``) before a prompt."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.head_ids = self._special_head()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def _special_head(self) -> list[int]:
        """The special tokens the tokenizer puts before text (usually BOS), found empirically."""
        with_special = self.tokenizer("a").input_ids
        plain = self.tokenizer("a", add_special_tokens=False).input_ids
        if with_special[len(with_special) - len(plain) :] == plain:
            return with_special[: len(with_special) - len(plain)]
        return []

    def request_ids(self, request: GenerationRequest) -> tuple[list[int], list[int]]:
        """(shared ids, own ids): the model sees their concatenation. Messages go through
        the tokenizer's chat template; a base model's tokenizer without one gets
        selfalign's own conversation format (``chat_format``), the one it trains in."""
        if request.messages is not None:
            template = None if getattr(self.tokenizer, "chat_template", None) else CHAT_TEMPLATE
            ids = self.tokenizer.apply_chat_template(
                list(request.messages),
                add_generation_prompt=True,
                tokenize=True,
                chat_template=template,
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return [], list(ids)
        if not request.prefix:
            return list(self.head_ids), self.encode(request.prompt)
        # The model sees the tokens of the joined text: tokenized apart, a SentencePiece
        # tokenizer (Llama-2, Mistral) starts the prompt with a word-boundary marker that
        # the joined text never has, and a merge may cross the boundary. The shared part is
        # the run of joined tokens the prefix's own tokens agree with (usually all of them).
        shared = self.head_ids + self.encode(request.prefix)
        joined = self.head_ids + self.encode(request.prefix + request.prompt)
        n = 0
        while n < min(len(shared), len(joined)) and shared[n] == joined[n]:
            n += 1
        return joined[:n], joined[n:]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-evaluation-harness's split: trailing context spaces move to the continuation,
        the whole string is tokenized, and the continuation is what follows the context.
        As in lm-eval 0.4.13 (tokenizer defaults), the context starts with the tokenizer's
        own leading special tokens (BOS for Llama/Mistral, none for Qwen)."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        if not context:
            first = self.tokenizer.bos_token_id
            return [first if first is not None else self.tokenizer.eos_token_id], self.encode(
                continuation
            )
        whole = self.head_ids + self.encode(context + continuation)
        ctx = self.head_ids + self.encode(context)
        return ctx, whole[len(ctx) :]
