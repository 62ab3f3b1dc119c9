"""SELF-ALIGN stage 2, principle-driven self-alignment: the base model answers every
stage-1 prompt after the principles and exemplars, thinking first; we keep the answers
whose thoughts have the expected form and that pass the answer checks.

Prompts are answered in a seeded random order (``max_prompts`` takes the first N of it), so
a cap samples the self-instruct and the red-team prompts alike.

Record: ``{"id", "prompt_id", "prompt", "source", "type", "thoughts", "answer", "principles",
"misnamed_rules", "trimmed", "truncated"}``; ``type`` is the red-team type of a TGRT prompt
(else null). ``trimmed``: a repeat loop was cut off the answer; ``truncated``: the token
limit stopped the answer (cut back to its last complete sentence when it stopped mid-way).
In both cases the model did not end the answer where the record does; engraving still trains
every kept answer with its end marker (leaving it out for these is not built yet). Every drop keeps the raw output and a reason (see ``REASONS``); a leak
also names the text it copies (``leak_source``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from selfalign.annotations import DEFAULT_EXEMPLARS
from selfalign.annotations.principles import Annotations, load_annotations, load_exemplars
from selfalign.backends import GenerationRequest, GenerationResult, SamplingParams
from selfalign.config import DEFAULT_ASSISTANT_NAME, StageConfig
from selfalign.errors import InputError
from selfalign.stages.api import Batch, Estimate, EstimateContext, MapWork, Stage, StageContext
from selfalign.stages.prompts import prompt_text, sample_prompts
from selfalign.store import record_id
from selfalign.text.answers import (
    REFUSAL_OPENERS,
    LeakDetector,
    complete_prefix,
    echoes,
    first_repeat,
    is_truncated,
    starts_with_refusal,
    words,
)
from selfalign.text.thoughts import (
    RULES_LEAD,
    STOP,
    StagePrompt,
    Thoughts,
    citation,
    fill,
    parse_thoughts,
    render_thoughts,
    split_generation,
    starts_with_self_description,
)
from selfalign.validation import ConfigPath

# Why an output was dropped, in the order the checks run.
REASONS = (
    "no_thoughts",  # the output does not start with thoughts
    "bad_thoughts_form",  # no self-description, analysis or rule number in the thoughts
    "no_answer",  # no answer turn, or an empty one
    "refusal",  # the answer opens with a refusal template
    "leaked_exemplar",  # the answer copies in-context prompt text or its own thoughts
    "repeated_clause",  # the same clause twice (on_repeat: drop)
    "truncated",  # token limit hit mid-sentence (on_truncated: drop, or nothing complete)
    "too_short",  # under min_chars once trimmed
)
OWN_THOUGHTS = "own thoughts"  # leak_source of an answer that repeats its thoughts
RULE_CITATION = "rule citation"  # leak_source of an answer that cites rules like thoughts
_CITES_RULES = re.compile(rf"\b{re.escape(RULES_LEAD[:-1])}s?\b[^.\n]*\d", re.I)
OPENING_WORDS = 5  # an answer opening with an exemplar answer's first words is counted


def _openers(value: str | list[str]) -> str | list[str]:
    if isinstance(value, str) and value not in REFUSAL_OPENERS:
        raise ValueError(f"must be one of {', '.join(REFUSAL_OPENERS)} or a list of openers")
    return value


class AlignedConfig(StageConfig):
    principles: ConfigPath | None = Field(None, description="principles YAML (default: shipped)")
    exemplars: ConfigPath | Annotated[list[ConfigPath | None], Field(min_length=1)] | None = Field(
        None,
        description="exemplars YAML (default: shipped), or a list of them whose exemplars are "
        "shown in order (null in the list: the shipped file); every file must give the same "
        "self_description",
    )
    RUN_NAME_FIELD = "final_name"

    generation_name: str = Field(
        "Kestrel", min_length=1, description="code name used while generating, then replaced"
    )
    final_name: str = Field(
        DEFAULT_ASSISTANT_NAME,
        min_length=1,
        description="replaces it in the kept answers (from the run's assistant_name)",
    )
    knowledge_cutoff: str = Field("2023", min_length=1, description="stated in the header")
    temperature: float = Field(0.5, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1)
    # Text -> bias on its first token (the paper discourages "Sorry"); {} turns it off.
    refusal_bias: dict[str, float] = Field(default_factory=lambda: {"Sorry": -100.0})
    refusal_openers: Annotated[str | list[str], AfterValidator(_openers)] = Field(
        "apology",
        description="answers opening with these are dropped: 'apology' (Sorry, I'm sorry, "
        "I apologize...), 'broad' (also 'As an AI...', 'I cannot provide...', 'I won't...', "
        "'Unfortunately, I...'; see answers.BROAD_REFUSAL_OPENERS) or your own list",
    )
    leak_ngram: int = Field(
        8,
        ge=0,
        description="words copied in a row from the prompt that count as a leak; 0 turns "
        "the leak checks off (the one for answers repeating their own thoughts too)",
    )
    min_clause_words: int = Field(4, ge=1, description="shortest clause the repeat check considers")
    on_repeat: Literal["trim", "drop"] = Field(
        "trim", description="a clause repeated: cut the answer before the repeat, or drop it"
    )
    on_truncated: Literal["trim", "drop"] = Field(
        "trim",
        description="token limit hit mid-sentence: cut back to the last complete sentence, "
        "or drop the answer",
    )
    min_chars: int = Field(
        160, ge=0, description="shortest answer kept, in characters, after trimming; 0 = off"
    )
    max_prompts: int | None = Field(
        None, ge=1, description="answer only N prompts, the first N of a seeded random order"
    )
    chunk_size: int = Field(64, ge=1, description="prompts per committed batch")


def exemplar_files(cfg: AlignedConfig) -> list[Path]:
    """``exemplars`` as a list of files, null standing for the shipped one."""
    given = cfg.exemplars if isinstance(cfg.exemplars, list) else [cfg.exemplars]
    return [Path(p) if p is not None else DEFAULT_EXEMPLARS for p in given]


def load_stage_annotations(cfg: AlignedConfig) -> Annotations:
    """The principles with the exemplars of every file, in order. Only one self-description
    can open the thoughts, so a later file whose own differs from the first's is refused
    (InputError) rather than quietly shown under the first one."""
    first, *more = exemplar_files(cfg)
    annotations = load_annotations(cfg.principles, first)
    exemplars = list(annotations.exemplars)
    for path in more:
        parsed = load_exemplars(path, num_principles=len(annotations.principles))
        if parsed.self_description != annotations.self_description:
            raise InputError(
                f"differs from the first exemplars file's ({annotations.exemplars_file}); "
                "every exemplars file must give the same one",
                file=path, field="self_description",
            )  # fmt: skip
        exemplars += parsed.exemplars
    return replace(annotations, exemplars=exemplars)


def annotation_files(cfg: AlignedConfig) -> list[Path]:
    """The principles and every exemplars file in use (validated now, so bad files fail at
    plan time)."""
    annotations = load_stage_annotations(cfg)
    return [*annotations.files, *exemplar_files(cfg)[1:]]


def leak_sources(prompt: StagePrompt) -> dict[str, str]:
    """Every text of the in-context prompt an answer could copy, by a name for the report."""
    a = prompt.annotations
    sources: dict[str, str] = {}
    for k, (ex, (user, _, answer)) in enumerate(
        zip(a.exemplars, prompt.exemplar_turns(), strict=True), 1
    ):
        covers = f": {ex.covers}" if ex.covers else ""
        rules = f"{RULES_LEAD} {citation(ex.rules, a)}."
        sources |= {
            f"exemplar {k} answer{covers}": answer,
            f"exemplar {k} thoughts{covers}": f"{prompt.fill(ex.analysis)} {rules}",
            f"exemplar {k} question{covers}": user,
        }
    sources["self-description"] = prompt.self_description
    for i, p in enumerate(a.principles, 1):
        sources[f"principle {i} ({p.name})"] = prompt.fill(p.text)
    sources["header"] = prompt.fill(a.header)
    return sources


@dataclass(frozen=True)
class Verdict:
    """``reason`` is "kept" or one of REASONS; ``fields`` are the kept record's fields, or
    details of a drop (``leak_source``)."""

    reason: str
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> bool:
        return self.reason == "kept"


@dataclass
class Judge:
    """Turns one generation into a kept record's fields or a drop reason."""

    prompt: StagePrompt
    cfg: AlignedConfig

    def __post_init__(self) -> None:
        a = self.prompt.annotations
        self.leaks = LeakDetector(leak_sources(self.prompt), self.cfg.leak_ngram)
        openers = self.cfg.refusal_openers
        self.openers = REFUSAL_OPENERS[openers] if isinstance(openers, str) else openers
        self._rename = re.compile(rf"\b{re.escape(self.cfg.generation_name)}\b")
        self._final_self = fill(a.self_description, self.cfg.final_name, self.prompt.cutoff)

    def rename(self, text: str, query: str) -> str:
        """Generation-time name -> final name, unless the user's query uses that word
        itself (a question about kestrels keeps its kestrels)."""
        if self._rename.search(query):
            return text
        return self._rename.sub(self.cfg.final_name, text)

    def leak_source(self, answer: str, thoughts: Thoughts, query: str) -> str | None:
        """What the answer copies: its own thoughts (a base model often repeats them as the
        answer), or a text of the in-context prompt."""
        if self.cfg.leak_ngram and echoes(answer, thoughts.text, query):
            return OWN_THOUGHTS
        if self.cfg.leak_ngram and _CITES_RULES.search(answer) and not _CITES_RULES.search(query):
            return RULE_CITATION  # its thoughts ran on into the answer
        return self.leaks.source(answer, query)

    def trim(self, answer: str, finish_reason: str, answer_cut: bool) -> Verdict:
        """The repeat and length policies: the answer to keep, cut where they say, with its
        ``trimmed`` and ``truncated`` flags; or a drop."""
        repeat = first_repeat(answer, self.cfg.min_clause_words)
        if repeat is not None:
            if self.cfg.on_repeat == "drop":
                return Verdict("repeated_clause")
            kept = complete_prefix(answer[:repeat])
            if not kept:  # nothing complete before the loop
                return Verdict("repeated_clause")
            return Verdict("kept", {"answer": kept, "trimmed": True, "truncated": False})
        hit_limit = finish_reason == "length" and not answer_cut
        if hit_limit and is_truncated(answer, finish_reason):
            answer = complete_prefix(answer) if self.cfg.on_truncated == "trim" else ""
            if not answer:
                return Verdict("truncated")
        return Verdict("kept", {"answer": answer, "trimmed": False, "truncated": hit_limit})

    def __call__(self, result: GenerationResult, query: str) -> Verdict:
        self_description = self.prompt.self_description
        split = split_generation(result.text)
        if not split.thoughts:
            return Verdict("no_thoughts")
        if split.answer is None:
            if starts_with_self_description(split.thoughts, self_description):
                return Verdict("no_answer")
            return Verdict("no_thoughts")
        thoughts = parse_thoughts(split.thoughts, self_description, self.prompt.annotations)
        if thoughts is None:
            return Verdict("bad_thoughts_form")
        if not split.answer:
            return Verdict("no_answer")
        if starts_with_refusal(split.answer, self.openers):
            return Verdict("refusal")
        leak = self.leak_source(split.answer, thoughts, query)
        if leak is not None:
            return Verdict("leaked_exemplar", {"leak_source": leak})
        trimmed = self.trim(split.answer, result.finish_reason, split.answer_cut)
        if not trimmed.kept:
            return trimmed
        cut = trimmed.fields
        if len(cut["answer"]) < self.cfg.min_chars:
            return Verdict("too_short")
        return Verdict("kept", {
            "thoughts": render_thoughts(
                self._final_self,
                self.rename(thoughts.analysis, query),
                citation(thoughts.principles, self.prompt.annotations),
            ),
            "answer": self.rename(cut["answer"], query),
            "principles": thoughts.principles,
            "misnamed_rules": thoughts.misnamed,
            "trimmed": cut["trimmed"],
            "truncated": cut["truncated"],
        })  # fmt: skip


def build(cfg: AlignedConfig) -> tuple[StagePrompt, Judge]:
    annotations = load_stage_annotations(cfg)
    prompt = StagePrompt(annotations, cfg.generation_name, cfg.knowledge_cutoff)
    return prompt, Judge(prompt, cfg)


def summarize(records: list[dict], dropped: list[dict], ctx: StageContext) -> dict[str, Any]:
    """Principle usage, kept-answer shape, refusals per prompt source and red-team type,
    and leaks per copied source."""
    prompt, _ = build(ctx.config)
    leaks = Counter(d.get("leak_source") for d in dropped if d["reason"] == "leaked_exemplar")
    rows = [*records, *dropped]
    return {
        **principle_usage(records, prompt.annotations),
        **answer_stats(records),
        "refusals": {
            "by_source": refusal_counts(rows, "source"),
            "by_type": refusal_counts(rows, "type"),
        },
        "leak_sources": dict(sorted(leaks.items(), key=lambda kv: (-kv[1], str(kv[0])))),
        "exemplar_openings": exemplar_openings(records, prompt),
    }


def exemplar_openings(records: list[dict], prompt: StagePrompt) -> dict[str, int]:
    """Kept answers opening with an exemplar answer's first ``OPENING_WORDS`` words, per
    exemplar. Not a drop: the real-time exemplar's opening is right for a real-time
    question; a high count on ordinary prompts shows a model applying one template to all."""
    openings = {
        f"exemplar {k} answer": tuple(words(answer)[:OPENING_WORDS])
        for k, (_, _, answer) in enumerate(prompt.exemplar_turns(), 1)
    }
    counts = Counter(
        name
        for r in records
        for name, opening in openings.items()
        if tuple(words(r["answer"])[:OPENING_WORDS]) == opening
    )
    return dict(counts.most_common())


def _percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile of sorted ``values``."""
    return values[max(0, math.ceil(q * len(values)) - 1)]


def answer_stats(records: list[dict]) -> dict[str, Any]:
    """Shares of kept answers that were trimmed (a repeat cut off), truncated (token limit),
    or cite a rule by a wrong name; the kept answers' length in characters."""
    n = len(records)

    def share(key: str) -> float:
        return round(sum(1 for r in records if r.get(key)) / n, 3) if n else 0.0

    chars = sorted(len(r["answer"]) for r in records)
    lengths = {"mean": round(sum(chars) / n, 1)} if n else {}
    lengths |= {f"p{q}": _percentile(chars, q / 100) for q in (10, 50, 90)} if n else {}
    return {
        "trimmed_share": share("trimmed"),
        "truncated_share": share("truncated"),
        "misnamed_share": share("misnamed_rules"),
        "answer_chars": lengths,
    }


def refusal_counts(rows: list[dict], key: str) -> dict[str, dict[str, int]]:
    """``{value of key: {"prompts": n, "refused": k}}`` over kept and dropped rows that
    have ``key`` (the prompt's ``source``; ``type`` for red-team prompts)."""
    out: dict[str, dict[str, int]] = {}
    for r in sorted(rows, key=lambda r: str(r.get(key))):
        if r.get(key) is None:
            continue
        counts = out.setdefault(str(r[key]), {"prompts": 0, "refused": 0})
        counts["prompts"] += 1
        counts["refused"] += r.get("reason") == "refusal"
    return out


def principle_usage(records: list[dict], annotations: Annotations) -> dict[str, Any]:
    """``{"principle_usage": {"1": count, ...}, "principle_names": {"1": "harmless", ...}}``."""
    counts = Counter(n for r in records for n in r.get("principles", []))
    numbered = list(enumerate(annotations.principles, 1))
    return {
        "principle_usage": {str(i): counts.get(i, 0) for i, _ in numbered},
        "principle_names": {str(i): p.name for i, p in numbered},
        "principles_per_answer": round(sum(counts.values()) / len(records), 3) if records else 0.0,
    }


def answer_order(
    prompts: list[dict[str, Any]], seed: int, cap: int | None
) -> dict[str, tuple[dict[str, Any], str]]:
    """Record id -> (prompt record, query) for the prompts to answer: the first ``cap``
    of a seeded random order (``sample_prompts``)."""
    items: dict[str, tuple[dict[str, Any], str]] = {}
    for p in sample_prompts(prompts, seed):
        query = prompt_text(p)
        items.setdefault(record_id(p["id"], query), (p, query))
    return dict(list(items.items())[:cap])


def _check_bias(ctx: StageContext, cfg: AlignedConfig) -> None:
    """Say when a biased text is several tokens: only its first token gets the bias."""
    backend = ctx.backend()
    encode, tokenizer = getattr(backend, "encode", None), getattr(backend, "tokenizer", None)
    if encode is None or tokenizer is None:
        return  # a remote backend: it tokenizes on its side
    for text in cfg.refusal_bias:
        pieces = encode(text)
        if len(pieces) > 1:
            first = tokenizer.decode(pieces[:1])
            ctx.log(
                f"refusal_bias: {text!r} is {len(pieces)} tokens here; only {first!r} is biased"
            )


def run_aligned(ctx: StageContext):
    cfg: AlignedConfig = ctx.config  # type: ignore[assignment]
    prompt, judge = build(cfg)
    prefix = prompt.prefix()
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        stop=STOP,
        logit_bias=dict(cfg.refusal_bias),
    )

    def answer(chunk: list[tuple[str, tuple[dict[str, Any], str]]]) -> Batch:
        requests = [
            GenerationRequest(
                prompt=prompt.query_prompt(query),
                prefix=prefix,
                params=params,
                seed=ctx.seed_for(source["id"]),
            )
            for _, (source, query) in chunk
        ]
        batch = Batch()
        for (rid, (source, query)), result in zip(
            chunk, ctx.backend().generate(requests), strict=True
        ):
            base = {"id": rid, "prompt_id": source["id"], "prompt": query,
                    "source": source.get("source"), "type": source.get("type")}  # fmt: skip
            if result.error is not None:
                batch.failed.append((base, result.error))
                continue
            verdict = judge(result, query)
            if verdict.kept:
                batch.keep.append({**base, **verdict.fields})
            else:
                out = {**base, "output": result.text, "finish_reason": result.finish_reason}
                batch.drop.append(({**out, **verdict.fields}, verdict.reason))
        return batch

    items = answer_order(ctx.inputs("prompts"), ctx.seed, cfg.max_prompts)
    yield MapWork(items, cfg.chunk_size, answer, start=lambda: _check_bias(ctx, cfg))


def estimate(cfg: AlignedConfig, ectx: EstimateContext) -> Estimate:
    """One request per stage-1 prompt (``max_prompts`` at most): the principles and
    exemplars, a typical prompt, up to ``max_new_tokens`` back; at most one record each."""
    n = min(ectx.inputs("prompts"), cfg.max_prompts or ectx.inputs("prompts"))
    prompt, _ = build(cfg)
    per = ectx.count_tokens(prompt.prefix() + prompt.query_prompt("")) + ectx.typical_prompt_tokens
    return Estimate(n, n * per, n * cfg.max_new_tokens, outputs=n)


STAGE = Stage(
    "aligned",
    AlignedConfig,
    run_aligned,
    inputs=("prompts",),
    summarize=summarize,
    annotation_files=annotation_files,
    estimate=estimate,
)
