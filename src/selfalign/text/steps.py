"""The reasoning steps of a chain and their delimiter strings (text only; the token ids
and routing that use them live in ``selfalign.mote.steps``)."""

from __future__ import annotations

QUESTION = 0
ANALYSIS, GUIDANCE, ANSWER = 1, 2, 3
STEPS: tuple[str, ...] = ("analysis", "guidance", "answer")  # step id = index + 1
STEP_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(STEPS)}


def start_token(step: str) -> str:
    return f"<|{step}|>"


def end_token(step: str) -> str:
    return f"<|/{step}|>"


def step_token_strings() -> list[str]:
    return [tok for step in STEPS for tok in (start_token(step), end_token(step))]


def strip_step_tokens(text: str) -> str:
    """Remove delimiter strings from free text, so no text can open or close a step."""
    for token in step_token_strings():
        text = text.replace(token, "")
    return text
