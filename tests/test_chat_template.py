"""The ``chat_template`` training setting: ours, ChatML, Llama-3 style, ``clone:PATH``, Jinja.

A base model whose vocabulary already holds ChatML's tokens (as Qwen's base models do) is
made from the tiny model by adding them; training with ``chatml`` must save a tokenizer
whose template and end-of-turn token reproduce the trained ids, and backends loading the
adapter must prompt and stop with that template.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfalign.backends import GenerationRequest, SamplingParams
from selfalign.backends.hf import HFBackend
from selfalign.errors import InputError
from selfalign.train.config import TrainConfig
from selfalign.train.sft import train_sft
from selfalign.train.template import choose_template

SYSTEM = "You are Tester, a careful assistant."
EXAMPLES = [
    {"prompt": "What is 2 plus 3?", "answer": "2 plus 3 is 5."},
    {"prompt": "Name a primary colour.", "answer": "Red is a primary colour."},
    {"prompt": "Say hello in French.", "answer": "Bonjour !"},
    {"prompt": "What day follows Monday?", "answer": "Tuesday follows Monday."},
]
FAST = {"max_steps": 2, "per_device_batch_size": 2, "global_batch_size": 2, "warmup_steps": 0,
        "gradient_checkpointing": False}  # fmt: skip
CHATML = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def chatml_base(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with ChatML's tokens in its vocabulary (rows initialised by resizing)."""
    out = tmp_path_factory.mktemp("chatml-base")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.add_special_tokens({"additional_special_tokens": CHATML})
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_chatml_training_saves_a_template_that_reproduces_the_trained_ids(
    chatml_base: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model"
    cfg = TrainConfig(**FAST, chat_template="chatml")
    train_sft(EXAMPLES, chatml_base, out, cfg, system_text=SYSTEM)
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.eos_token == "<|im_end|>"
    text = saved.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (f"<s><|im_start|>system\n{SYSTEM}<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
    check = json.loads((out / "train_log.json").read_text())["template_check"]
    n = len(EXAMPLES)
    assert check == {"examples": n, "identical": n, "end_token": "<|im_end|>", "end_trained": n,
                     "ok": True}  # fmt: skip

    # base + adapter through the hf backend: the adapter's tokenizer renders chat requests
    # and its end-of-turn token stops generation.
    backend = HFBackend(chatml_base, adapter=str(out), device="cpu")
    assert backend.tokenizer.eos_token == "<|im_end|>"
    assert saved.convert_tokens_to_ids("<|im_end|>") in backend.eos_ids
    request = GenerationRequest(
        "", params=SamplingParams(max_new_tokens=4, temperature=0.0),
        messages=({"role": "user", "content": "Hi"},),
    )  # fmt: skip
    shared, own = backend.tokens.request_ids(request)
    assert (
        shared == []
        and own
        == saved.apply_chat_template(
            [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True
        )["input_ids"]
    )
    assert backend.generate([request])[0].error is None
    backend.close()


def test_a_template_whose_tokens_the_base_lacks_is_refused_before_training(
    tiny_model: Path, tmp_path: Path
) -> None:
    for name in ("chatml", "llama3"):
        cfg = TrainConfig(**FAST, chat_template=name)
        with pytest.raises(InputError, match="base vocabulary lacks") as err:
            train_sft(EXAMPLES, tiny_model, tmp_path / name, cfg, system_text=SYSTEM)
        assert err.value.field == "chat_template"
        assert not (tmp_path / name / "adapter_model.safetensors").exists()


def test_clone_takes_another_tokenizers_template_and_end_token(
    chatml_base: Path, tmp_path: Path
) -> None:
    source = tmp_path / "instruct-sibling"
    tokenizer = AutoTokenizer.from_pretrained(chatml_base)
    tokenizer.chat_template = choose_template("chatml", "").jinja
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.save_pretrained(source)
    choice = choose_template(f"clone:{source}", SYSTEM)
    assert choice.jinja == tokenizer.chat_template and choice.end_token == "<|im_end|>"
    assert set(CHATML) <= set(choice.special_tokens)

    with pytest.raises(InputError, match="local tokenizer directory"):
        choose_template(f"clone:{tmp_path / 'missing'}", SYSTEM)
    with pytest.raises(InputError, match="must be one of"):
        choose_template("vicuna", SYSTEM)
    raw = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert choose_template(raw, SYSTEM).jinja == raw


def test_llama3_template_renders_headers_and_the_default_system_text() -> None:
    from jinja2 import Template

    text = Template(choose_template("llama3", SYSTEM).jinja).render(
        messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True,
        bos_token="<|begin_of_text|>",
    )  # fmt: skip
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        f"{SYSTEM}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_messages_to_a_model_without_a_chat_template_use_our_format(tiny_model: Path) -> None:
    """A base model converted without a chat template (Gemma 3 270M from its GGUF) as a
    judge: its messages are written in selfalign's own format, not refused with a trace."""
    from selfalign.backends.tokens import RequestTokenizer
    from selfalign.chat_format import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    messages = ({"role": "system", "content": "Check the reply."},
                {"role": "user", "content": "Is this safe?"})  # fmt: skip
    request = GenerationRequest(prompt="", params=SamplingParams(), messages=messages)
    with_template = RequestTokenizer(tokenizer).request_ids(request)
    tokenizer.chat_template = None
    plain = RequestTokenizer(tokenizer)
    shared, own = plain.request_ids(request)
    assert shared == [] and own == plain.head_ids + plain.encode(
        render_prompt("Check the reply.", "Is this safe?")
    )
    assert (shared, own) == with_template  # the tiny model's template is that format too
