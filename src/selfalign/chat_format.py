"""The conversation format selfalign trains and prompts in, and its Jinja chat template.

    {system}

    ### User:
    {user}

    ### Assistant:
    {assistant}</s>

The same markers are used by generation stages (stop at the next user turn) and by the
chat template saved with every model we train, so ``apply_chat_template`` and
``vllm serve`` format conversations exactly as training did. That template carries the
training system text and writes it when a conversation has none.
"""

from __future__ import annotations

import json

USER_TAG = "### User:"
ASSISTANT_TAG = "### Assistant:"
TURN_SEP = "\n\n"
NEXT_USER_TURN = TURN_SEP + USER_TAG  # the stop string for assistant turns


def chat_template(default_system: str = "") -> str:
    """The Jinja chat template; ``default_system`` is written when a conversation has no
    system message, so a bare ``[user]`` conversation renders as training rendered it.

    The text goes in as a JSON string literal: JSON's escapes (quotes, backslashes,
    newlines) are valid Jinja escapes, and Jinja syntax inside it stays plain text.
    """
    return (
        # Separators are Jinja string literals: transformers renders templates with
        # trim_blocks, which would eat a raw newline after a block tag.
        "{{ bos_token }}"
        "{% set default_system = " + json.dumps(default_system, ensure_ascii=False) + " %}"
        "{% set add_system = messages and messages[0]['role'] != 'system' and default_system %}"
        "{% if add_system %}{{ default_system }}{% endif %}"
        "{% for m in messages %}"
        "{% if add_system or not loop.first %}{{ '\\n\\n' }}{% endif %}"
        "{% if m['role'] == 'system' %}{{ m['content'] }}"
        "{% elif m['role'] == 'user' %}{{ '" + USER_TAG + "\\n' + m['content'] }}"
        "{% elif m['role'] == 'assistant' %}"
        "{{ '" + ASSISTANT_TAG + "\\n' + m['content'] + eos_token }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '\\n\\n" + ASSISTANT_TAG + "\\n' }}{% endif %}"
    )


# No default system text: the tiny model's tokenizer and conversations that bring their own.
CHAT_TEMPLATE = chat_template()


def user_turn(text: str) -> str:
    return f"{USER_TAG}\n{text}"


def assistant_turn_open() -> str:
    return f"{ASSISTANT_TAG}\n"


def render_prompt(system: str, user: str) -> str:
    """Text the model sees before writing its answer (no BOS: backends add it)."""
    return f"{system}{TURN_SEP}{user_turn(user)}{TURN_SEP}{assistant_turn_open()}"
