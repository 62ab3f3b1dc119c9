"""Step-wise decoding: the model writes a chain, one expert per step, one KV cache.

Adaptive mode lets the model choose which steps to write: after the question, and after
each step ends, only the start tokens of later steps are allowed (the answer always
comes last); inside a step only its own end token among the delimiters. Fixed modes
insert the start tokens themselves. Both are ``StepGrammar`` rules that ``model.generate``
applies as a logits processor; the answer's end token is generate's EOS. Whichever way a
start token arrives, feeding it switches the routing: the new step's expert (+ shared)
computes it and everything after it, while the K/V of earlier tokens stay as they were
computed by their own step's expert, exactly as in packed training.

Sampling draws per question (``SeededSampler``), so a chain does not depend on its batch.

The expanded baseline was trained with every token of an example (question and earlier
steps) computed by that example's step expert, so it decodes that way too
(``MoteConfig.recompute_at_switch``): question by question, generation stops after each
start token, and the next phase prefills the whole context again with the new step's
expert before writing the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

from selfalign.backends.sampling import SeededSampler, sole_generation_config
from selfalign.errors import InputError
from selfalign.mote.data import prompt_ids
from selfalign.mote.grammar import StepGrammar
from selfalign.mote.model import mote_state
from selfalign.mote.steps import StepTokens
from selfalign.text.steps import ANSWER, QUESTION, STEPS

Mode = Literal["adaptive", "answer", "analysis_answer", "full"]
MODES: dict[str, tuple[str, ...] | None] = {
    "adaptive": None,
    "answer": ("answer",),
    "analysis_answer": ("analysis", "answer"),
    "full": STEPS,
}


def step_label(step: str, first: bool) -> str:
    """What precedes a step's text when the steps are shown."""
    return ("" if first else "\n\n") + f"[{step}]\n"


@dataclass
class StepOutput:
    """A generated chain; ``record()`` is the chain record the data stage writes."""

    question: str
    analysis: str | None = None
    guidance: str | None = None
    answer: str | None = None
    steps: list[str] = field(default_factory=list)  # in the order written
    finished: bool = False  # the answer's end token was reached
    token_ids: list[int] = field(default_factory=list)  # generated (and inserted) tokens
    logits: torch.Tensor | None = None  # (len(token_ids), vocab) when asked for

    def record(self) -> dict[str, str | None]:
        return {
            "question": self.question,
            "analysis": self.analysis,
            "guidance": self.guidance,
            "answer": self.answer or "",
        }

    def render(self) -> str:
        """Human-readable steps (what ``selfalign chat`` shows)."""
        return "".join(
            step_label(s, i == 0) + (getattr(self, s) or "") for i, s in enumerate(self.steps)
        )


@torch.no_grad()
def generate_steps(
    model,
    tokenizer,
    questions: Sequence[str],
    *,
    mode: Mode = "adaptive",
    system: str | None = None,
    max_new_tokens: int = 512,
    max_step_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    return_logits: bool = False,
    streamer: BaseStreamer | None = None,
) -> list[StepOutput]:
    """Write a chain for each question (a model from ``build_mote``/``load_mote``).

    ``system`` defaults to the system prompt the model was trained with. Sampling is
    seeded per question (``seed`` + its index), so results do not depend on batching.
    A ``streamer`` (one question only) gets the tokens as generate writes them.
    """
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}", field="mode")
    if streamer is not None and len(questions) != 1:
        raise InputError("a streamer needs exactly one question", field="questions")
    state = mote_state(model)
    system = state.system if system is None else system
    grammar = StepGrammar(
        state.tokens, plan=MODES[mode], eos_token_id=tokenizer.eos_token_id,
        max_step_tokens=max_step_tokens,
    )  # fmt: skip
    out: list[StepOutput] = []
    recompute = state.router is not None and state.config.recompute_at_switch
    if recompute:
        batch_size = 1  # each question's phases end at its own step switches
    for start in range(0, len(questions), batch_size):
        chunk = list(questions[start : start + batch_size])
        processors = LogitsProcessorList([grammar])
        if temperature > 0:  # drawn per question, only where the grammar lets it choose
            processors.append(TemperatureLogitsWarper(temperature))
            seeds = [seed + start + i for i in range(len(chunk))]
            processors.append(SeededSampler(seeds, chooses=grammar.chooses, top_p=top_p))
        if recompute:
            out.append(_generate_recomputed(
                model, tokenizer, grammar, processors, chunk[0], system, max_new_tokens,
                return_logits, streamer,
            ))  # fmt: skip
            continue
        out += _generate_batch(
            model, tokenizer, grammar, processors, chunk, system, max_new_tokens,
            return_logits, streamer,
        )  # fmt: skip
    return out


class _AfterStartToken(StoppingCriteria):
    """Stops once the row has written a step's start token in this call."""

    def __init__(self, tokens: StepTokens, prompt_len: int) -> None:
        self.starts = torch.tensor(sorted(tokens.start))
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        written = input_ids.shape[1] > self.prompt_len
        last = torch.isin(input_ids[:, -1], self.starts.to(input_ids.device))
        return last & written


def _generate_recomputed(
    model, tokenizer, grammar: StepGrammar, processors: LogitsProcessorList, question: str,
    system: str | None, max_new_tokens: int, return_logits: bool,
    streamer: BaseStreamer | None,
) -> StepOutput:  # fmt: skip
    """One question, one ``generate`` call per phase: the first writes the first start
    token (question routing); each next one prefills question + everything written with
    every token routed to the step just started, and writes until the next start token.
    A ``streamer`` gets the prompt, then each phase's tokens, then its end."""
    router = mote_state(model).router
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt = prompt_ids(tokenizer, question, system)
    written: list[int] = []
    logits: list[torch.Tensor] = []
    step = None
    if streamer is not None:
        streamer.put(torch.tensor(prompt))
    try:
        while len(written) < max_new_tokens:
            router.force_step = step
            ids = torch.tensor([prompt + written], device=device)
            budget = max_new_tokens - len(written)
            config = _generation_config(grammar.tokens, pad, budget, return_logits)
            stop = StoppingCriteriaList([_AfterStartToken(grammar.tokens, ids.shape[1])])
            with sole_generation_config(config, model):
                gen = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids),
                    logits_processor=processors, generation_config=config, stopping_criteria=stop,
                )  # fmt: skip
            new = gen.sequences[0, ids.shape[1] :].tolist()
            if return_logits:
                logits.append(torch.stack(gen.logits, 1)[0].cpu())
            written += new
            if streamer is not None and new:
                streamer.put(torch.tensor(new))
            step = grammar.tokens.step_of_start(written[-1]) if new else None
            if step is None:  # the answer ended, or the budget ran out mid-step
                break
    finally:
        router.force_step = None
        if streamer is not None:
            streamer.end()
    output = _split(tokenizer, grammar.tokens, question, written)
    if return_logits and output.token_ids:
        output.logits = torch.cat(logits)[: len(output.token_ids)]
    return output


def _generate_batch(
    model, tokenizer, grammar: StepGrammar, processors: LogitsProcessorList,
    questions: list[str], system: str | None, max_new_tokens: int, return_logits: bool,
    streamer: BaseStreamer | None,
) -> list[StepOutput]:  # fmt: skip
    if max_new_tokens <= 0:
        return [StepOutput(q) for q in questions]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [prompt_ids(tokenizer, q, system) for q in questions]
    width = max(len(p) for p in prompts)
    inp = torch.full((len(prompts), width), pad, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):  # left padding
        inp[b, width - len(p) :] = torch.tensor(p)
        attn[b, width - len(p) :] = 1
    config = _generation_config(grammar.tokens, pad, max_new_tokens, return_logits)
    with sole_generation_config(config, model):
        gen = model.generate(
            input_ids=inp.to(device), attention_mask=attn.to(device),
            logits_processor=processors, generation_config=config, streamer=streamer,
        )  # fmt: skip
    new = gen.sequences[:, width:].tolist()
    logits = torch.stack(gen.logits, 1).cpu() if return_logits else None
    outputs = [
        _split(tokenizer, grammar.tokens, q, row) for q, row in zip(questions, new, strict=True)
    ]
    if logits is not None:
        for b, o in enumerate(outputs):
            o.logits = logits[b, : len(o.token_ids)] if o.token_ids else None
    return outputs


def _generation_config(
    tokens: StepTokens, pad: int, max_new_tokens: int, return_logits: bool
) -> GenerationConfig:
    """Greedy over the processors' scores; the answer's end token stops a row. It is the
    only config the call sees (``sole_generation_config``): settings a model's own
    generation_config may carry (sampling, repetition penalty, minimum length) stay at
    their neutral defaults, so the chain is shaped by the grammar alone."""
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[tokens.end[ANSWER - 1]],
        pad_token_id=pad, return_dict_in_generate=True, output_logits=return_logits,
    )  # fmt: skip


def _split(tokenizer, tokens: StepTokens, question: str, ids: list[int]) -> StepOutput:
    """The ``StepOutput`` of one row's generated ids (up to the answer's end token)."""
    out = StepOutput(question)
    step, content = QUESTION, []
    for token in ids:
        out.token_ids.append(token)
        if step == QUESTION:  # between steps the grammar allows only start tokens
            step, content = tokens.step_of_start(token), []
            if step is None:
                raise RuntimeError(f"token {token} between steps is not a start token")
            out.steps.append(STEPS[step - 1])
        elif tokens.step_of_end(token) == step:
            setattr(out, STEPS[step - 1], _text(tokenizer, content))
            if step == ANSWER:
                out.finished = True
                break
            step = QUESTION
        else:
            content.append(token)
    if step != QUESTION and not out.finished:  # ran out of tokens mid-step: keep what was written
        setattr(out, STEPS[step - 1], _text(tokenizer, content))
    return out


def _text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
