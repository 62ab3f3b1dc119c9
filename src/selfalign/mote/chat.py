"""One chat turn with a MoTE model (what ``selfalign chat`` calls for a MoTE directory).

    from selfalign.mote import is_mote_dir, load_mote
    from selfalign.mote.chat import mote_reply, mote_reply_stream

    model, tokenizer = load_mote(path, device="cuda")
    text = mote_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], show_steps=True)
    for piece in mote_reply_stream(model, tokenizer, [{"role": "user", "content": "Hi"}]):
        print(piece, end="", flush=True)

MoTE models are trained on single-turn chains. For a longer history, the earlier turns
are given to the model as a transcript inside the last user message (``history_question``);
a ``system`` message replaces the system prompt the model was trained with.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Sequence
from threading import Thread
from typing import Any

from transformers import TextIteratorStreamer

from selfalign.mote.generate import Mode, StepOutput, generate_steps, step_label
from selfalign.mote.model import mote_state
from selfalign.mote.steps import StepTokens
from selfalign.text.aligncot import dialogue_question
from selfalign.text.steps import ANSWER, STEPS

STOPPED = "\n\n[stopped: token limit reached]"


def history_question(history: Sequence[dict[str, str]]) -> tuple[str, str | None]:
    """(question text, system override) from chat messages; the last must be the user's.
    Earlier turns are written into the question as the chains stage writes a multi-turn
    query (``aligncot.dialogue_question``), so a MoTE model is asked as it was trained."""
    turns = [m for m in history if m.get("role") != "system"]
    systems = [m["content"] for m in history if m.get("role") == "system"]
    if not turns or turns[-1].get("role") != "user":
        raise ValueError("the last message of the history must be the user's")
    question = dialogue_question([(m["role"], m["content"]) for m in turns])
    return question, systems[-1] if systems else None


def reply_text(out: StepOutput, show_steps: bool) -> str:
    """The answer, or with ``show_steps`` every step written, labelled."""
    if show_steps:
        return out.render() if out.finished else out.render() + STOPPED
    return out.answer or ""


def mote_reply(
    model,
    tokenizer,
    history: Sequence[dict[str, str]],
    *,
    show_steps: bool = False,
    mode: Mode = "adaptive",
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> str:
    """The assistant's reply to the last user message: the answer, or with ``show_steps``
    every step the model wrote, labelled (``[analysis]``, ``[guidance]``, ``[answer]``)."""
    question, system = history_question(history)
    out = generate_steps(
        model, tokenizer, [question], mode=mode, system=system, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, seed=seed, batch_size=1,
    )[0]  # fmt: skip
    return reply_text(out, show_steps)


def mote_reply_stream(
    model,
    tokenizer,
    history: Sequence[dict[str, str]],
    *,
    show_steps: bool = False,
    mode: Mode = "adaptive",
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> Iterator[str]:
    """``mote_reply`` as it is written: pieces of text that join to the same reply."""
    question, system = history_question(history)
    streamer = StepStreamer(tokenizer, mote_state(model).tokens, show_steps=show_steps)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            generate_steps(
                model, tokenizer, [question], mode=mode, system=system,
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                seed=seed, batch_size=1, streamer=streamer,
            )  # fmt: skip
        except BaseException as exc:  # handed to the reading thread below
            failure.append(exc)
        finally:
            streamer.end()  # no-op after generate's own end()

    worker = Thread(target=work, daemon=True)
    worker.start()
    yield from streamer
    worker.join()
    if failure:
        raise failure[0]


class StepStreamer(TextIteratorStreamer):
    """Reply text from the token ids generate() writes, in the form ``reply_text`` gives.

    Delimiters open and close steps (a label is shown when ``show_steps``; otherwise only
    the answer's text is). A step's text is stripped like ``StepOutput``'s, and while the
    step is open its last word is held back (it may still change as tokens arrive), so
    what has been sent is always a prefix of the final text.
    """

    def __init__(self, tokenizer, tokens: StepTokens, *, show_steps: bool, **kwargs: Any):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, **kwargs)
        self.tokens = tokens
        self.show_steps = show_steps
        self.step: int | None = None  # open step id
        self.content: list[int] = []
        self.sent = ""  # text of the open step already sent
        self.labels = 0  # labels sent
        self.finished = False
        self.ended = False

    def put(self, value) -> None:
        if self.next_tokens_are_prompt:  # generate hands over the prompt first
            self.next_tokens_are_prompt = False
            return
        for token in value.reshape(-1).tolist():
            self._token(token)

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.step is not None:  # stopped mid-step: its text so far
            self._send_text(final=True)
        if self.show_steps and not self.finished:
            self.on_finalized_text(STOPPED)
        self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def _token(self, token: int) -> None:
        if self.finished:
            return  # padding after the answer
        if self.step is None:
            self.step, self.content, self.sent = self.tokens.step_of_start(token), [], ""
            if self.show_steps and self.step is not None:
                self.on_finalized_text(step_label(STEPS[self.step - 1], self.labels == 0))
                self.labels += 1
        elif self.tokens.step_of_end(token) == self.step:
            self._send_text(final=True)
            self.finished = self.step == ANSWER
            self.step = None
        else:
            self.content.append(token)
            self._send_text(final=False)

    def _send_text(self, final: bool) -> None:
        if not self.show_steps and self.step != ANSWER:
            return
        text = self.tokenizer.decode(self.content, **self.decode_kwargs).strip()
        if not final and text and not _wide(text[-1]):
            text = re.sub(r"\s*\S*$", "", text)  # hold back the last word
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.on_finalized_text(text[len(self.sent) :])
            self.sent = text


def _wide(char: str) -> bool:
    """CJK-style characters are words of their own (as in ``TextStreamer``)."""
    return unicodedata.east_asian_width(char) in ("W", "F")
