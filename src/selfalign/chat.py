"""``selfalign chat MODEL``: talk to a model in the terminal.

The conversation is formatted by the model tokenizer's own chat template, exactly as in
training; replies stream token by token. ``/reset`` clears the history, ``/exit`` (or
Ctrl-D) leaves. A MoTE model directory answers step by step and can show its steps.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from threading import Thread
from typing import TYPE_CHECKING

from selfalign.backends.spec import parse_spec
from selfalign.errors import InputError

if TYPE_CHECKING:
    from selfalign.backends import BackendConfig

Reply = Callable[[list[dict[str, str]]], Iterator[str]]


def hf_reply(path: Path, max_new_tokens: int, temperature: float) -> Reply:
    """Stream a local model's reply with transformers' TextIteratorStreamer."""
    import torch
    from transformers import TextIteratorStreamer

    from selfalign.backends.hf import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(path)
    if tokenizer.chat_template is None:
        raise InputError("the tokenizer has no chat template", file=path)

    def reply(messages: list[dict[str, str]]) -> Iterator[str]:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(
            **{k: v.to(model.device) for k, v in ids.items()},
            streamer=streamer, max_new_tokens=max_new_tokens,
            do_sample=temperature > 0, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        if temperature > 0:
            kwargs["temperature"] = temperature
        with torch.no_grad():
            worker = Thread(target=model.generate, kwargs=kwargs, daemon=True)
            worker.start()
            yield from streamer
            worker.join()

    return reply


def backend_reply(
    spec: str, max_new_tokens: int, temperature: float, api_key_env: str = "OPENAI_API_KEY"
) -> Reply:
    """Any other backend (a server, vLLM): the whole reply at once."""
    from selfalign.backends import GenerationRequest, SamplingParams, load_backend

    backend = load_backend(backend_config(spec, api_key_env))
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)

    def reply(messages: list[dict[str, str]]) -> Iterator[str]:
        result = backend.generate([GenerationRequest(prompt="", messages=tuple(messages),
                                                     params=params)])[0]  # fmt: skip
        if result.error:
            raise RuntimeError(result.error)
        yield result.text

    return reply


def mote_reply_fn(path: Path, max_new_tokens: int, temperature: float, show_steps: bool) -> Reply:
    """Stream a MoTE model's reply step by step (``mote_reply_stream``)."""
    from selfalign.mote import load_mote
    from selfalign.mote.chat import mote_reply_stream

    model, tokenizer = load_mote(path)

    def reply(messages: list[dict[str, str]]) -> Iterator[str]:
        yield from mote_reply_stream(
            model, tokenizer, messages, show_steps=show_steps, max_new_tokens=max_new_tokens,
            temperature=temperature,
        )  # fmt: skip

    return reply


def backend_config(spec: str, api_key_env: str) -> BackendConfig:
    """The backend block for ``spec``; a bad option value is bad input (exit 2)."""
    from pydantic import ValidationError

    from selfalign.backends import BackendConfig
    from selfalign.validation import describe_error, field_path

    try:
        return BackendConfig(model=spec, api_key_env=api_key_env)
    except ValidationError as e:
        loc, msg = describe_error(e)
        raise InputError(msg, field="--" + field_path(loc).replace("_", "-")) from None


def make_reply(
    spec: str,
    max_new_tokens: int,
    temperature: float,
    show_steps: bool,
    *,
    api_key_env: str = "OPENAI_API_KEY",
) -> Reply:
    parsed = parse_spec(spec)
    if parsed.kind == "hf":
        if not parsed.path.is_dir():
            raise InputError("model directory not found", file=parsed.path)
        from selfalign.mote import is_mote_dir

        if is_mote_dir(parsed.path):
            return mote_reply_fn(parsed.path, max_new_tokens, temperature, show_steps)
        return hf_reply(parsed.path, max_new_tokens, temperature)
    return backend_reply(spec, max_new_tokens, temperature, api_key_env)


def chat_loop(reply: Reply, system: str, name: str) -> None:
    history: list[dict[str, str]] = [{"role": "system", "content": system}]
    print(f"Chatting with {name}. /reset clears the conversation, /exit leaves.", flush=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            del history[1:]
            print("(conversation cleared)", flush=True)
            continue
        history.append({"role": "user", "content": text})
        print(f"{name}> ", end="", flush=True)
        parts = []
        for piece in reply(history):
            parts.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        print(flush=True)
        history.append({"role": "assistant", "content": "".join(parts).strip()})
