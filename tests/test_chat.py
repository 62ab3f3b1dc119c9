"""`selfalign chat` driven through a pseudo-terminal, like a person at a keyboard."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfalign.chat import chat_loop


def read_until(fd: int, marker: bytes, timeout: float = 120) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while marker not in out:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {marker!r}; got {out[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    return out


def test_chat_in_a_pseudo_terminal(tiny_model: Path) -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "selfalign.cli", "chat", str(tiny_model), "--max-new-tokens", "6",
         "--temperature", "0", "--name", "Tiny"],
        stdin=slave, stdout=slave, stderr=slave, close_fds=True,
    )  # fmt: skip
    os.close(slave)
    try:
        banner = read_until(master, b"you> ")
        assert b"Chatting with Tiny" in banner
        os.write(master, b"Hello there, who are you?\n")
        first = read_until(master, b"you> ")
        assert b"Tiny> " in first
        reply = first.split(b"Tiny> ", 1)[1].rsplit(b"you> ", 1)[0].strip()
        assert reply, "the model streamed a reply"
        os.write(master, b"/reset\n")
        assert b"(conversation cleared)" in read_until(master, b"you> ")
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_history_is_kept_and_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[dict[str, str]]] = []

    def reply(messages: list[dict[str, str]]):
        seen.append([dict(m) for m in messages])
        yield "ok "
        yield "then"

    lines = iter(["first", "second", "/reset", "third", "/exit"])
    monkeypatch.setattr("builtins.input", lambda _prompt: next(lines))
    chat_loop(reply, "SYS", "Bot")
    roles = [[m["role"] for m in msgs] for msgs in seen]
    assert roles == [
        ["system", "user"],
        ["system", "user", "assistant", "user"],
        ["system", "user"],
    ]
    assert seen[1][2] == {"role": "assistant", "content": "ok then"}
    assert seen[2][1]["content"] == "third"


def test_chat_with_a_missing_model_exits_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "selfalign.cli", "chat", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope'}: model directory not found"


def test_chat_template_writes_its_default_system_text_verbatim(tiny_model: Path) -> None:
    """The default goes in as a string literal: quotes, backslashes, line breaks, accents
    and Jinja syntax in it come out as written, never interpreted."""
    from transformers import AutoTokenizer

    from selfalign.chat_format import chat_template, render_prompt

    system = (
        'You are "Wren", an assistant for C:\\Users\\ana.\nWrite {{ name }} and {% raw %} '
        "literally; say 'je ne sais pas' when unsure. Café ☕"
    )
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = chat_template(system)
    user = [{"role": "user", "content": "What's the weather like?"}]
    text = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert text == tok.bos_token + render_prompt(system, "What's the weather like?")
    # multi-turn without a system message: the default once, at the start
    turns = [*user, {"role": "assistant", "content": "I can't see outside."}, *user]
    text = tok.apply_chat_template(turns, tokenize=False)
    assert text.count(system) == 1 and text.startswith(tok.bos_token + system + "\n\n### User:")
    # no default: the conversation alone, as before
    tok.chat_template = chat_template()
    text = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert text == tok.bos_token + "### User:\nWhat's the weather like?\n\n### Assistant:\n"
