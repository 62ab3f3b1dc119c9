"""The chat template a trained model carries, and the proof that it is the one it learned.

``chat_template`` (a training setting) chooses the conversation format:

- ``selfalign`` (default): ours (``chat_format``): the training system text is built in, the
  turn ends with the tokenizer's EOS;
- ``chatml``: ``<|im_start|>role ... <|im_end|>`` (Qwen, many others); the turn ends with
  ``<|im_end|>``;
- ``llama3``: Llama-3 headers, the turn ends with ``<|eot_id|>``;
- ``clone:PATH``: the template and end-of-turn token of another local tokenizer (for
  example the instruction-tuned sibling of the base model);
- any other text is taken as a Jinja template (the turn ends with EOS).

Our ChatML and Llama-3 templates also write the training system text when a conversation
has none, like ours. A template's special tokens must already be single tokens of the base
vocabulary: a LoRA cannot learn embeddings for tokens added now, so a missing one is an
input error rather than a model that can never end its turn.

``template_round_trip`` checks, after training, that the saved tokenizer renders the
training conversations to exactly the ids that were trained, and that the end-of-turn token
is among the trained (loss-bearing) tokens.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfalign.chat_format import chat_template
from selfalign.errors import InputError

NAMED = ("selfalign", "chatml", "llama3")
CLONE = "clone:"


@dataclass(frozen=True)
class TemplateChoice:
    source: str  # selfalign, chatml, llama3, clone:PATH or jinja
    jinja: str
    end_token: str | None  # closes an assistant turn; None: the tokenizer's EOS
    special_tokens: tuple[str, ...] = ()  # must each be one token of the vocabulary


def _system_default(system_text: str) -> str:
    return (
        "{% set default_system = " + json.dumps(system_text, ensure_ascii=False) + " %}"
        "{% set add_system = messages and messages[0]['role'] != 'system' and default_system %}"
    )


def chatml_template(system_text: str) -> str:
    return (
        "{% if bos_token %}{{ bos_token }}{% endif %}" + _system_default(system_text)
        + "{% if add_system %}{{ '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}"
        "{% endif %}"
        "{% for m in messages %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )  # fmt: skip


def llama3_template(system_text: str) -> str:
    head = "'<|start_header_id|>' + {} + '<|end_header_id|>\\n\\n'"
    return (
        "{% if bos_token %}{{ bos_token }}{% endif %}" + _system_default(system_text)
        + "{% if add_system %}{{ " + head.format("'system'") + " + default_system + '<|eot_id|>' }}"
        "{% endif %}"
        "{% for m in messages %}"
        "{{ " + head.format("m['role']") + " + m['content'] + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ " + head.format("'assistant'") + " }}{% endif %}"
    )  # fmt: skip


def choose_template(setting: str | None, system_text: str) -> TemplateChoice:
    """What a ``chat_template`` setting means (a ``clone:`` path is read here)."""
    setting = setting or "selfalign"
    if setting == "selfalign":
        return TemplateChoice("selfalign", chat_template(system_text), None)
    if setting == "chatml":
        return TemplateChoice(
            "chatml", chatml_template(system_text), "<|im_end|>", ("<|im_start|>", "<|im_end|>")
        )
    if setting == "llama3":
        tokens = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
        return TemplateChoice("llama3", llama3_template(system_text), "<|eot_id|>", tokens)
    if setting.startswith(CLONE):
        return _clone(Path(setting[len(CLONE) :]).expanduser())
    if "{{" not in setting and "{%" not in setting:
        raise InputError(
            f"must be one of {', '.join(NAMED)}, clone:PATH or a Jinja template",
            field="chat_template",
        )
    return TemplateChoice("jinja", setting, None)


def _clone(path: Path) -> TemplateChoice:
    """Another tokenizer's template and end-of-turn token (its EOS), as trl's
    ``clone_chat_template`` takes them, minus adding tokens (see the module docstring)."""
    from transformers import AutoTokenizer

    if not path.is_dir():
        raise InputError("clone: needs a local tokenizer directory", file=path,
                         field="chat_template")  # fmt: skip
    source = AutoTokenizer.from_pretrained(path)
    if not source.chat_template:
        raise InputError("this tokenizer has no chat template", file=path, field="chat_template")
    special = tuple(t for t in source.all_special_tokens if t in source.chat_template)
    return TemplateChoice(f"{CLONE}{path}", source.chat_template, source.eos_token, special)


def apply_template(tokenizer: Any, choice: TemplateChoice) -> None:
    """Give ``tokenizer`` the chosen template; its EOS becomes the template's end-of-turn
    token, so generation (and ``vllm serve``) stops where a turn ends."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (*choice.special_tokens, choice.end_token) if t and t not in vocab]
    if missing:
        raise InputError(
            f"the {choice.source} template needs {', '.join(missing)}, which the base "
            "vocabulary lacks (new tokens would need trained embeddings); use selfalign or a "
            "template whose tokens the base model has",
            field="chat_template",
        )
    tokenizer.chat_template = choice.jinja
    if choice.end_token:
        tokenizer.eos_token = choice.end_token


def render_chat(tokenizer: Any, messages: list[dict[str, str]], **kwargs: bool) -> str:
    """A conversation as text through the tokenizer's chat template, without the leading
    BOS the template writes: backends put the tokenizer's own BOS before every prompt."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    bos = tokenizer.bos_token
    return text[len(bos) :] if bos and text.startswith(bos) else text


def _ids(output: Any) -> list[int]:
    return list(output["input_ids"] if hasattr(output, "keys") else output)


def template_round_trip(
    saved_dir: Path, conversations: list[list[dict[str, str]]], rows: list[dict], max_length: int
) -> dict[str, Any]:
    """Render each training conversation with the tokenizer saved in ``saved_dir`` and
    compare with the rows the trainer trained on (``input_ids`` plus ``completion_mask`` or
    ``labels``). ``identical``: rows whose ids the rendering reproduces exactly (cut at
    ``max_length`` as training cut them); ``end_trained``: rows whose loss covers the
    end-of-turn token (a row cut before its end cannot)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(saved_dir)
    rendered = Counter(
        tuple(_ids(tokenizer.apply_chat_template(c, tokenize=True))[:max_length])
        for c in conversations
    )
    end_id = tokenizer.eos_token_id
    identical = end_trained = 0
    for row in rows:
        ids = list(row["input_ids"])
        if rendered[tuple(ids)] > 0:
            rendered[tuple(ids)] -= 1
            identical += 1
        if "completion_mask" in row:
            trained = [i for i, m in zip(ids, row["completion_mask"], strict=True) if m]
        else:
            trained = [i for i, label in zip(ids, row["labels"], strict=True) if label != -100]
        end_trained += end_id in trained
    return {
        "examples": len(rows),
        "identical": identical,
        "end_token": tokenizer.eos_token,
        "end_trained": end_trained,
        "ok": identical == len(rows),
    }
