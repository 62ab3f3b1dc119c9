"""The ``preferences`` stage: (prompt, chosen, rejected) pairs from the principles alone,
with no human label. Two sources, chosen by ``sources``:

- ``contrast`` (RLCD-like): chosen is stage 2's principled answer; rejected is the same
  base model's answer (the stage's backend: the run's by default) to the same prompt
  without the principles (``rejected: plain``: the
  brief system text only) or told to ignore one principle drawn per prompt
  (``rejected: negated``, RLCD's negative prompt in our words).
- ``self_judged``: the engraved model (``self_judged.writer``: a server of it; by default
  the run's backend loads it) writes two sampled answers per prompt, and a judge
  (the engraved model itself by default) compares them under one principle drawn per
  prompt, in both orders: log P(" A") and log P(" B") after the two answers as options, as
  the HHH eval scores them. The margin of answer 1 over answer 2 is the mean over the two
  orders of its letter's log-odds; a pair whose two orders prefer different answers is
  dropped (``orders_disagree``), one whose margin is under ``min_margin`` nats too
  (``low_margin``).

Each pair is checked like every stage's output, drops counted by reason: an answer that is
empty, too short, junk or an echo of the prompt, or cut by the token limit with nothing
complete left (``on_truncated: trim`` keeps its complete sentences) (``rejected_*`` /
``answer_*``), both answers
the same text (``identical``), both refusals (``both_refused``). Record:
``{"id", "prompt_id", "prompt", "chosen", "rejected", "source", "principle", "chosen_from",
"rejected_from", "margin", "scores"}``. Resumable per prompt like every map stage.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from selfalign.annotations.principles import DEFAULT_PRINCIPLES, Principle, load_principles
from selfalign.backends import (
    Backend,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    ScoreRequest,
)
from selfalign.backends.config import BackendConfig
from selfalign.chat_format import NEXT_USER_TURN, render_prompt
from selfalign.config import DEFAULT_ASSISTANT_NAME, StageConfig
from selfalign.errors import InputError
from selfalign.eval.heldout import is_refusal
from selfalign.eval.hhh import HHH_SYSTEM, LETTERS, hhh_context
from selfalign.stages.api import Batch, Estimate, EstimateContext, MapWork, Stage, StageContext
from selfalign.stages.prompts import prompt_text, sample_prompts
from selfalign.stages.training import PLAIN_SYSTEM_TEXT, stage_model_backend, trained_system_text
from selfalign.stages.verbose import clean_answer, verdict
from selfalign.store import record_id
from selfalign.text.answers import complete_prefix, echoes, is_truncated, words
from selfalign.validation import ConfigPath, StrictModel

Source = Literal["contrast", "self_judged"]
NEGATED_SYSTEM_TEXT = (
    "You are {name}, an AI assistant. In this conversation you disregard one of your "
    "usual rules, this one: {rule}"
)
JUDGE_QUESTION = (
    "The assistant should follow this principle: {rule}\n\n"
    "Which option follows the principle better?"
)


class ContrastSettings(StrictModel):
    rejected: Literal["plain", "negated"] = Field(
        "plain",
        description="the rejected answer's prompt: the brief system text alone (plain), or a "
        "system text telling the model to disregard one principle drawn per prompt (negated)",
    )
    negated_system_text: str = Field(NEGATED_SYSTEM_TEXT, description="'{name}', '{rule}'")


class SelfJudgeSettings(StrictModel):
    prompts_from: Literal["prompts", "aligned"] = Field(
        "prompts", description="every stage-1 prompt, or only those stage 2 kept an answer for"
    )
    temperature: float = Field(0.8, gt=0, description="the two answers are sampled")
    top_p: float = Field(0.95, gt=0, le=1)
    min_margin: float = Field(
        0.1, ge=0, description="nats: pairs the judge prefers by less are dropped (low_margin)"
    )
    writer: BackendConfig | None = Field(
        None, description="a server of the engraved model; default: the run's backend with it"
    )
    judge: BackendConfig | None = Field(
        None, description="who judges; default: the engraved model itself (the writer)"
    )


class PreferencesConfig(StageConfig):
    RUN_NAME_FIELD = "assistant_name"

    assistant_name: str = Field(DEFAULT_ASSISTANT_NAME, description="from the run's assistant_name")
    sources: list[Source] = Field(["contrast"], min_length=1)
    contrast: ContrastSettings = Field(default_factory=ContrastSettings)
    self_judged: SelfJudgeSettings = Field(default_factory=SelfJudgeSettings)
    principles: ConfigPath | None = Field(
        None, description="principles YAML a rule is drawn from (default: the shipped one)"
    )
    system_text: str = Field(PLAIN_SYSTEM_TEXT, description="'{name}' is replaced")
    max_prompts: int | None = Field(
        None, ge=1, description="per source: the first N prompts of the run's seeded order"
    )
    max_new_tokens: int = Field(256, gt=0)
    temperature: float = Field(0.5, ge=0, description="contrast: the rejected answer")
    top_p: float = Field(0.9, gt=0, le=1)
    min_words: int = Field(5, ge=1, description="shorter generated answers are dropped")
    on_truncated: Literal["trim", "drop"] = Field(
        "trim",
        description="a generated answer the token limit cut mid-sentence: cut back to its "
        "last complete sentence (as stage 2 does), or drop the pair",
    )
    chunk_size: int = Field(16, ge=1, description="prompts per committed batch")


def inputs_of(cfg: PreferencesConfig) -> tuple[str, ...]:
    needs = set()
    if "contrast" in cfg.sources:
        needs.add("aligned")
    if "self_judged" in cfg.sources:
        needs.update({"engraved", cfg.self_judged.prompts_from})
    return tuple(n for n in ("prompts", "aligned", "engraved") if n in needs)


def annotation_files(cfg: PreferencesConfig) -> list[Path]:
    load_principles(cfg.principles)  # a bad file fails at plan time
    return [Path(cfg.principles or DEFAULT_PRINCIPLES)]


def draw_principle(principles: list[Principle], seed: int) -> Principle:
    return random.Random(seed).choice(principles)


def rule_text(principle: Principle, name: str) -> str:
    return principle.text.replace("{name}", name)


def generated_answer(result: GenerationResult, trim: bool) -> tuple[str, str]:
    """(the cleaned answer, its finish reason). ``trim``: an answer the token limit cut
    mid-sentence is cut back to its last complete sentence and counts as finished."""
    answer = clean_answer(result.text)
    if trim and is_truncated(answer, result.finish_reason):
        return complete_prefix(answer), "stop"
    return answer, result.finish_reason


def answer_problem(
    answer: str, finish_reason: str, seen: tuple[str, ...], min_words: int
) -> str | None:
    """Why a generated answer cannot stand in a pair, or None: ``verdict``'s reasons, and
    ``echo`` for an answer that mostly repeats text its prompt showed (``seen``: the user
    turn, the system text). Gemma 3 270M repeats the request without the principles, and
    its own system text once engraved; a pair with such an answer teaches nothing about
    the principles."""
    if why := verdict(answer, finish_reason, min_words):
        return why
    return "echo" if any(echoes(answer, text) for text in seen if text) else None


def pair_problem(chosen: str, rejected: str) -> str | None:
    """Why two good answers still make no pair: nothing to prefer between them."""
    if " ".join(words(chosen)) == " ".join(words(rejected)):
        return "identical"
    if is_refusal(chosen) and is_refusal(rejected):
        return "both_refused"
    return None


def judge_margin(values: list[float]) -> tuple[float, bool]:
    """(margin of answer 1 over answer 2 in nats, whether both orders agree) from the four
    scores ``[A fwd, B fwd, A rev, B rev]``: forward shows answer 1 as A, reverse as B."""
    a_fwd, b_fwd, a_rev, b_rev = values
    forward, reverse = a_fwd - b_fwd, b_rev - a_rev
    return (forward + reverse) / 2, (forward > 0) == (reverse > 0) and forward * reverse != 0


def judge_requests(prompt: str, first: str, second: str, rule: str) -> list[ScoreRequest]:
    question = JUDGE_QUESTION.format(rule=rule)
    return [
        ScoreRequest(hhh_context(prompt, a, b, HHH_SYSTEM, question), letter)
        for a, b in ((first, second), (second, first))
        for letter in LETTERS
    ]


def contrast_items(ctx: StageContext, cfg: PreferencesConfig) -> dict[str, dict]:
    kept = sample_prompts(ctx.inputs("aligned"), ctx.seed, key="prompt_id")[: cfg.max_prompts]
    return {record_id("preferences", "contrast", r["id"]): r for r in kept}


def run_contrast(ctx: StageContext, cfg: PreferencesConfig, principles: list[Principle]):
    name = cfg.assistant_name
    plain = cfg.system_text.replace("{name}", name)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            top_p=cfg.top_p, stop=(NEXT_USER_TURN,))  # fmt: skip

    def process(chunk: list[tuple[str, dict]]) -> Batch:
        batch, requests, recs = Batch(), [], []
        for rid, aligned in chunk:
            rec = {"id": rid, "prompt_id": aligned["prompt_id"], "prompt": aligned["prompt"],
                   "chosen": aligned["answer"], "source": "contrast", "chosen_from": "aligned",
                   "rejected_from": f"base_{cfg.contrast.rejected}", "principle": None}  # fmt: skip
            system = plain
            if cfg.contrast.rejected == "negated":
                rule = draw_principle(principles, ctx.seed_for("principle", rid))
                rec["principle"] = rule.name
                system = cfg.contrast.negated_system_text.replace("{name}", name).replace(
                    "{rule}", rule_text(rule, name)
                )
            recs.append(rec)
            requests.append(GenerationRequest(render_prompt(system, aligned["prompt"]),
                                              params=params, seed=ctx.seed_for(rid)))  # fmt: skip
        for rec, result in zip(recs, ctx.backend(alone=True).generate(requests), strict=True):
            if result.error:
                batch.failed.append((rec, result.error))
                continue
            rec["rejected"], finish = generated_answer(result, cfg.on_truncated == "trim")
            why = answer_problem(rec["rejected"], finish, (rec["prompt"], system), cfg.min_words)
            why = f"rejected_{why}" if why else pair_problem(rec["chosen"], rec["rejected"])
            if why:
                batch.drop.append((rec, why))
            else:
                batch.keep.append(rec)
        return batch

    return MapWork(contrast_items(ctx, cfg), cfg.chunk_size, process)


def self_judged_items(ctx: StageContext, cfg: PreferencesConfig) -> dict[str, tuple[str, str]]:
    if cfg.self_judged.prompts_from == "aligned":
        rows = sample_prompts(ctx.inputs("aligned"), ctx.seed, key="prompt_id")
        items = [(r["prompt_id"], r["prompt"]) for r in rows]
    else:
        items = [(p["id"], prompt_text(p)) for p in sample_prompts(ctx.inputs("prompts"), ctx.seed)]  # fmt: skip
    items = list(dict.fromkeys(items))[: cfg.max_prompts]
    return {record_id("preferences", "self_judged", pid): (pid, q) for pid, q in items}


def judge_pairs(
    judge: Backend, pending: list[tuple[dict, list[ScoreRequest]]], min_margin: float,
    batch: Batch,
) -> None:  # fmt: skip
    """Score each pair's four letters and sort it into ``batch``: kept with the preferred
    answer as chosen, or dropped (``orders_disagree``, ``low_margin``, ``unscored`` for a
    score that is not a number). A scoring failure fails the pairs, to be asked again."""
    try:
        scores = judge.score([r for _, reqs in pending for r in reqs])
    except InputError:
        raise
    except Exception as e:  # the judge's server or memory: the records are asked again
        batch.failed.extend((rec, f"judge: {type(e).__name__}: {e}") for rec, _ in pending)
        return
    for k, (rec, _) in enumerate(pending):
        values = scores[4 * k : 4 * k + 4]
        first, second = rec.pop("answers")
        if not all(math.isfinite(v) for v in values):
            batch.drop.append(({**rec, "chosen": first, "rejected": second}, "unscored"))
            continue
        margin, agree = judge_margin(values)
        chosen, rejected = (first, second) if margin > 0 else (second, first)
        rec.update(chosen=chosen, rejected=rejected, margin=round(abs(margin), 4),
                   scores=[round(v, 4) for v in values])  # fmt: skip
        if not agree:
            batch.drop.append((rec, "orders_disagree"))
        elif abs(margin) < min_margin:
            batch.drop.append((rec, "low_margin"))
        else:
            batch.keep.append(rec)


def run_self_judged(ctx: StageContext, cfg: PreferencesConfig, principles: list[Principle]):
    settings = cfg.self_judged
    # what the engraved model's template puts before every question
    system = trained_system_text(ctx.artifact("engraved")) or ""
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=settings.temperature,
                            top_p=settings.top_p, stop=(NEXT_USER_TURN,))  # fmt: skip
    writer = stage_model_backend(
        ctx, "engraved", settings.writer, "stages.preferences.self_judged.writer"
    )
    judge = settings.judge or writer

    def process(chunk: list[tuple[str, tuple[str, str]]]) -> Batch:
        batch = Batch()
        requests = [
            GenerationRequest(
                "",
                params=params,
                seed=ctx.seed_for(rid, k),
                messages=({"role": "user", "content": question},),
            )  # fmt: skip
            for rid, (_, question) in chunk
            for k in (0, 1)
        ]
        results = ctx.backend(writer).generate(requests)
        pending: list[tuple[dict, list[ScoreRequest]]] = []
        for i, (rid, (pid, question)) in enumerate(chunk):
            rule = draw_principle(principles, ctx.seed_for("principle", rid))
            rec: dict[str, Any] = {"id": rid, "prompt_id": pid, "prompt": question,
                                   "source": "self_judged", "chosen_from": "engraved",
                                   "rejected_from": "engraved", "principle": rule.name}  # fmt: skip
            pair = results[2 * i : 2 * i + 2]
            if error := next((r.error for r in pair if r.error), None):
                batch.failed.append((rec, error))
                continue
            written = [generated_answer(r, cfg.on_truncated == "trim") for r in pair]
            answers = rec["answers"] = [a for a, _ in written]
            why = next((f"answer_{w}" for a, finish in written
                        if (w := answer_problem(a, finish, (question, system), cfg.min_words))),
                       None)  # fmt: skip
            why = why or pair_problem(*answers)
            if why:
                batch.drop.append((rec, why))
                continue
            rule_line = rule_text(rule, cfg.assistant_name)
            pending.append((rec, judge_requests(question, *answers, rule_line)))
        if pending:
            judge_pairs(ctx.backend(judge), pending, settings.min_margin, batch)
        return batch

    # writer and judge stay loaded together; the contrast source's base model goes first
    return MapWork(self_judged_items(ctx, cfg), cfg.chunk_size, process, start=ctx.close)


def run_preferences(ctx: StageContext) -> Iterator[MapWork]:
    cfg: PreferencesConfig = ctx.config  # type: ignore[assignment]
    principles = list(load_principles(cfg.principles).principles)
    if "contrast" in cfg.sources:
        yield run_contrast(ctx, cfg, principles)
    if "self_judged" in cfg.sources:
        yield run_self_judged(ctx, cfg, principles)


def summarize(records: list[dict], dropped: list[dict], ctx: StageContext) -> dict[str, Any]:
    """Per source: kept, drops by reason, answer lengths (DPO learns any length bias the
    pairs have: ``chosen_longer`` is the share of pairs whose chosen answer is longer),
    and for self-judged pairs the judge's margins."""
    stats: dict[str, Any] = {}
    for source in ("contrast", "self_judged"):
        kept = [r for r in records if r["source"] == source]
        drops = [r for r in dropped if r["source"] == source]
        if not kept and not drops:
            continue
        entry: dict[str, Any] = {"kept": len(kept), "dropped": dict(Counter(r["reason"] for r in drops))}  # fmt: skip
        if kept:
            chosen = [len(words(r["chosen"])) for r in kept]
            rejected = [len(words(r["rejected"])) for r in kept]
            entry.update(
                chosen_words_mean=round(sum(chosen) / len(kept), 1),
                rejected_words_mean=round(sum(rejected) / len(kept), 1),
                chosen_longer=round(sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(kept), 3),
            )  # fmt: skip
        judged = [r for r in kept + drops if "margin" in r]
        if judged:
            entry["orders_agree"] = round(
                sum(r.get("reason") != "orders_disagree" for r in judged) / len(judged), 3
            )
            entry["margin_mean"] = round(sum(r["margin"] for r in judged) / len(judged), 4)
        stats[source] = entry
    return stats


def estimate(cfg: PreferencesConfig, ectx: EstimateContext) -> Estimate:
    """Contrast: one base-model request per kept stage-2 answer. Self-judged: two answers
    per prompt from the engraved model, then four scored letters per pair."""
    total = Estimate()
    system = render_prompt(cfg.system_text, "")
    per = ectx.count_tokens(system) + ectx.typical_prompt_tokens
    if "contrast" in cfg.sources:
        n = min(ectx.inputs("aligned"), cfg.max_prompts or ectx.inputs("aligned"))
        total += Estimate(n, n * per, n * cfg.max_new_tokens, outputs=n)
    if "self_judged" in cfg.sources:
        n = ectx.inputs(cfg.self_judged.prompts_from)
        n = min(n, cfg.max_prompts or n)
        judge = ectx.count_tokens(hhh_context("", "", "", HHH_SYSTEM, JUDGE_QUESTION))
        judge += ectx.typical_prompt_tokens + 2 * cfg.max_new_tokens
        total += Estimate(6 * n, 2 * n * per + 4 * n * judge, 2 * n * cfg.max_new_tokens,
                          outputs=n)  # fmt: skip
    return total


STAGE = Stage(
    "preferences",
    PreferencesConfig,
    run_preferences,
    inputs=("prompts", "aligned", "engraved"),
    inputs_of=inputs_of,
    summarize=summarize,
    annotation_files=annotation_files,
    estimate=estimate,
    version=2,  # 2: answers echoing the system text are dropped too
)
