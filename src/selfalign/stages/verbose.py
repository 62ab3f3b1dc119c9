"""SELF-ALIGN stage 4, verbose cloning (context distillation).

The engraved model (the teacher), prompted with a system text that asks for thorough
answers and one long in-context answer in that style (``annotations/verbose_exemplar.yaml``),
answers every stage-1 prompt (as the reference implementation does: refused and truncated
prompts of stage 2 included; ``prompts_from: aligned`` limits it to stage 2's kept ones).
The answers are cleaned and filtered (each drop counted by reason); then a fresh LoRA on
the *base* model learns to give those answers from the plain system text alone. The final
assistant is ``verbose/model`` (merged weights: plain ``from_pretrained``, ``vllm serve``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from selfalign.annotations import ANNOTATIONS_DIR
from selfalign.annotations.principles import Prose, validate_file
from selfalign.backends import GenerationRequest, SamplingParams
from selfalign.chat_format import ASSISTANT_TAG, NEXT_USER_TURN, TURN_SEP, USER_TAG, user_turn
from selfalign.config import DEFAULT_ASSISTANT_NAME, StageConfig
from selfalign.errors import InputError, StageError
from selfalign.stages.api import (
    Artifact,
    Batch,
    Estimate,
    EstimateContext,
    MapWork,
    Stage,
    StageContext,
)
from selfalign.stages.prompts import prompt_text, sample_prompts
from selfalign.stages.training import (
    PLAIN_SYSTEM_TEXT,
    LaunchConfig,
    base_model_dir,
    sft_train_tokens,
    stage_model_backend,
    train_log,
    train_model,
    training_summary,
)
from selfalign.stages.turn_end import TurnEndCheck, check_turn_end, turn_end_stats
from selfalign.store import atomic_write_json, record_id
from selfalign.text.answers import is_truncated, words
from selfalign.text.thoughts import THOUGHTS_TAG
from selfalign.train.config import TrainConfig, with_defaults
from selfalign.train.export import TRAIN_LOG
from selfalign.validation import ConfigPath, StrictModel

DEFAULT_VERBOSE_EXEMPLAR = ANNOTATIONS_DIR / "verbose_exemplar.yaml"
VERBOSE_SYSTEM_TEXT = (
    "You are {name}, an AI assistant who gives complete, well-organised answers. Explain "
    "your reasoning, cover the relevant sides of the question, use lists or steps where "
    "they help, and add a short example when it makes the answer clearer. Stay accurate "
    "and say plainly when you are unsure."
)
# the student learns answers up to max_new_tokens (512) after a prompt: 768 tokens in all
STUDENT_TRAIN_DEFAULTS: dict[str, object] = {"max_length": 768}
MIN_LENGTH_RATIO = 1.3  # below this the teacher is barely more verbose than stage 2
_SENTENCE = re.compile(r"(?<=[.!?])[ \t]+")
_TURN_TAGS = (USER_TAG, ASSISTANT_TAG, THOUGHTS_TAG)
_FENCE = "```"


class VerboseExemplar(StrictModel):
    """The teacher's in-context conversation turn pair, in the verbose style."""

    user: Prose
    answer: Prose


def load_exemplar(path: Path | None) -> VerboseExemplar:
    return validate_file(VerboseExemplar, Path(path or DEFAULT_VERBOSE_EXEMPLAR))


NGramPenalties = dict[
    Annotated[int, Field(ge=1)], Annotated[float, Field(ge=0, allow_inf_nan=False)]
]


class VerboseConfig(StageConfig):
    prompts_from: Literal["prompts", "aligned"] = Field(
        "prompts",
        description="what the teacher answers: every stage-1 prompt (the reference "
        "implementation), or only the prompts whose stage-2 answer was kept",
    )
    max_prompts: int | None = Field(
        None,
        ge=1,
        description="answer only N prompts: the first N of the seeded order "
        "stage 2 uses, so both answer the same prompts",
    )
    RUN_NAME_FIELD = "assistant_name"

    assistant_name: str = Field(DEFAULT_ASSISTANT_NAME, description="from the run's assistant_name")
    verbose_system_text: str = Field(VERBOSE_SYSTEM_TEXT, description="the teacher's prompt")
    exemplar: ConfigPath | None = Field(
        None,
        description="YAML with the teacher's in-context turn pair (user, answer); "
        "default: the shipped verbose_exemplar.yaml",
    )
    system_text: str = Field(PLAIN_SYSTEM_TEXT, description="what the student sees")
    temperature: float = Field(0.3, ge=0)
    top_p: float = Field(0.7, gt=0, le=1)
    max_new_tokens: int = Field(512, gt=0)
    ngram_penalties: NGramPenalties = Field(
        default_factory=lambda: {3: 1.0, 4: 2.0},
        description="n -> p: a token's logit drops by p times the number of times the n-gram "
        "it would complete was already generated (generated tokens only; fenced code exempt)",
    )
    no_repeat_ngram_size: int = Field(
        0, ge=0, description="ban repeating any n-gram of the generated tokens; 0 = off"
    )
    repetition_penalty: float = Field(1.0, gt=0)
    min_words: int = Field(8, ge=1, description="shorter answers are dropped")
    batch_size: int = Field(16, gt=0, description="prompts sent to the backend at once")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(**STUDENT_TRAIN_DEFAULTS))
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    turn_end: TurnEndCheck = Field(default_factory=TurnEndCheck)

    @field_validator("train", mode="before")
    @classmethod
    def _student_schedule(cls, value: object) -> object:
        return with_defaults(STUDENT_TRAIN_DEFAULTS, value)


def annotation_files(cfg: VerboseConfig) -> list[Path]:
    """The exemplar in use (validated now, so a bad file fails at plan time)."""
    load_exemplar(cfg.exemplar)
    return [Path(cfg.exemplar or DEFAULT_VERBOSE_EXEMPLAR)]


def _fence_line(line: str) -> bool:
    return line.lstrip().startswith(_FENCE)


def cut_at_turn(text: str) -> str:
    """The text before the first line that opens one of our turns (user, assistant,
    thoughts) outside a code fence. Markdown headings and ``###`` comments in code stay."""
    lines = text.split("\n")
    in_code = False
    for i, line in enumerate(lines):
        if _fence_line(line):
            in_code = not in_code
        elif not in_code and line.lstrip().startswith(_TURN_TAGS):
            return "\n".join(lines[:i])
    return text


def clean_answer(text: str) -> str:
    """Cut at the next turn, then drop sentences (of 4+ words) that repeat an earlier one.
    Line breaks are kept, so lists and code keep their layout; code is never deduplicated."""
    seen: set[str] = set()
    lines = []
    in_code = False
    for line in cut_at_turn(text).strip().split("\n"):
        if _fence_line(line):
            in_code = not in_code
        if in_code or _fence_line(line):
            lines.append(line)
            continue
        kept = []
        for sentence in _SENTENCE.split(line):
            key = " ".join(words(sentence))
            if len(key.split()) >= 4 and key in seen:
                continue
            seen.add(key)
            kept.append(sentence)
        if kept or not line.strip():
            lines.append(" ".join(kept))
    return "\n".join(lines).strip()


def verdict(answer: str, finish_reason: str, min_words: int) -> str | None:
    """The drop reason for a cleaned teacher answer, or None to keep it."""
    n_words = len(words(answer))
    if not answer:
        return "empty"
    if is_truncated(answer, finish_reason):
        return "truncated"
    if n_words < min_words:
        return "too_short"
    if sum(c.isalnum() for c in answer) < 0.5 * len(answer.replace(" ", "")):
        return "junk"
    return None


def length_ratio(verbose: list[dict], aligned: list[dict]) -> tuple[float, int] | None:
    """Mean characters of the kept verbose answers over those of the stage-2 answers to the
    same prompts (only prompts both kept), and how many prompts that is; None if none."""
    stage2 = {r.get("prompt_id"): r["answer"] for r in aligned if r.get("answer")}
    pairs = [(r["answer"], stage2[r["prompt_id"]]) for r in verbose if r["prompt_id"] in stage2]
    shorter = sum(len(b) for _, b in pairs)
    if not shorter:
        return None
    return sum(len(a) for a, _ in pairs) / shorter, len(pairs)


def _summary(records: list[dict], dropped: list[dict], ctx: StageContext) -> dict:
    lengths = sorted(len(words(r["answer"])) for r in records)
    stats = {**training_summary(ctx.artifact()), **turn_end_stats(ctx)}
    if lengths:
        stats["answer_words_mean"] = round(sum(lengths) / len(lengths), 1)
        stats["answer_words_median"] = lengths[len(lengths) // 2]
    ratio = length_ratio(records, ctx.inputs("aligned"))
    if ratio is not None:
        stats["length_ratio_vs_aligned"] = round(ratio[0], 3)
        stats["length_ratio_prompts"] = ratio[1]
    return stats


def teacher_questions(ctx: StageContext, cfg: VerboseConfig) -> list[tuple[str, str]]:
    """(stage-1 prompt id, user turn text) for every prompt the teacher answers."""
    if cfg.prompts_from == "aligned":
        kept = sample_prompts(ctx.inputs("aligned"), ctx.seed, key="prompt_id")
        items = [(r["prompt_id"], r["prompt"]) for r in kept]
    else:
        items = [(p["id"], prompt_text(p)) for p in sample_prompts(ctx.inputs("prompts"), ctx.seed)]  # fmt: skip
    return list(dict.fromkeys(items))[: cfg.max_prompts]


def teacher_prefix(cfg: VerboseConfig) -> str:
    """System text, then the exemplar turn pair: what precedes every question."""
    ex = load_exemplar(cfg.exemplar)
    text = (
        cfg.verbose_system_text + TURN_SEP + user_turn(ex.user) + TURN_SEP
        + ASSISTANT_TAG + "\n" + ex.answer.strip() + TURN_SEP
    )  # fmt: skip
    return text.replace("{name}", cfg.assistant_name)


def teacher_turns(ctx: StageContext, cfg: VerboseConfig) -> tuple[str, Callable[[str], str]]:
    """(shared prefix, question -> the rest of the prompt) for the teacher. In our format
    the text is built here; an engraved model trained with another chat template is
    prompted through that template (the same system text and exemplar turn pair). A teacher
    the stage's own backend block serves is prompted in our format."""
    served = ctx.config.backend is not None
    if served or train_log(ctx.artifact("engraved"))["config"].get("chat_template") in (
        None,
        "selfalign",
    ):
        return teacher_prefix(cfg), lambda q: user_turn(q) + TURN_SEP + ASSISTANT_TAG + "\n"
    from transformers import AutoTokenizer

    from selfalign.train.template import render_chat

    tokenizer = AutoTokenizer.from_pretrained(ctx.artifact("engraved"))
    ex = load_exemplar(cfg.exemplar)
    system = cfg.verbose_system_text.replace("{name}", cfg.assistant_name)
    turns = [{"role": "system", "content": system}, {"role": "user", "content": ex.user},
             {"role": "assistant", "content": ex.answer.strip()}]  # fmt: skip

    prefix = render_chat(tokenizer, turns)

    def prompt(question: str) -> str:
        whole = render_chat(
            tokenizer, [*turns, {"role": "user", "content": question}], add_generation_prompt=True
        )
        if not whole.startswith(prefix):
            raise InputError("the engraved model's chat template does not render earlier turns "
                             "the same when a turn follows", field="stages.engraved.train.chat_template")  # fmt: skip
        return whole[len(prefix) :]

    return prefix, prompt


def _warn_if_not_verbose(ctx: StageContext, records: list[dict[str, Any]]) -> None:
    ratio = length_ratio(records, ctx.inputs("aligned"))
    if ratio is not None and ratio[0] < MIN_LENGTH_RATIO:
        ctx.log(
            f"warning: the teacher's answers are only {ratio[0]:.2f}x as long as stage 2's "
            f"(on {ratio[1]} prompts; expected >= {MIN_LENGTH_RATIO}): the verbose prompt "
            "may not be working; check verbose_system_text and the exemplar"
        )


def run_verbose(ctx: StageContext) -> Iterator[MapWork | Artifact]:
    cfg: VerboseConfig = ctx.config  # type: ignore[assignment]
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        stop=(NEXT_USER_TURN,), no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        ngram_penalties=tuple(sorted(cfg.ngram_penalties.items())),
        repetition_penalty=cfg.repetition_penalty,
    )  # fmt: skip
    prefix, prompt_for = teacher_turns(ctx, cfg)

    def answer(chunk: list[tuple[str, tuple[str, str]]]) -> Batch:
        requests = [
            GenerationRequest(
                prefix=prefix,
                prompt=prompt_for(question),
                params=params,
                seed=ctx.seed_for(pid),
            )  # fmt: skip
            for _, (pid, question) in chunk
        ]
        batch = Batch()
        results = ctx.backend(
            stage_model_backend(ctx, "engraved", ctx.config.backend, "stages.verbose.backend")
        ).generate(requests)
        for (rid, (pid, question)), result in zip(chunk, results, strict=True):
            rec = {"id": rid, "prompt_id": pid, "prompt": question}
            if result.error:
                batch.failed.append((rec, result.error))  # asked again on resume
                continue
            answer = clean_answer(result.text)
            why = verdict(answer, result.finish_reason, cfg.min_words)
            rec["answer"] = answer
            if why:
                batch.drop.append((rec, why))
            else:
                batch.keep.append(rec)
        return batch

    items = {record_id("verbose", pid): (pid, q) for pid, q in teacher_questions(ctx, cfg)}
    yield MapWork(items, cfg.batch_size, answer)
    _warn_if_not_verbose(ctx, ctx.records)
    kept = [{"prompt": r["prompt"], "answer": r["answer"]} for r in ctx.records]
    if not kept:
        raise StageError("the teacher's answers were all dropped: nothing to clone")
    yield Artifact(lambda folder: train_student(ctx, cfg, kept, folder), examples=len(kept))
    check_turn_end(ctx, ctx.artifact(), cfg.turn_end)


def train_student(ctx: StageContext, cfg: VerboseConfig, kept: list[dict], folder: Path) -> None:
    """A fresh LoRA (or full fine-tune) of the base model on the teacher's answers, with
    the plain system text; a LoRA is merged, so the final model loads without peft."""
    ctx.log(f"training a fresh LoRA on the base model with {len(kept)} verbose answers")
    system_text = cfg.system_text.replace("{name}", cfg.assistant_name)
    base = base_model_dir(ctx.run.model)
    if cfg.train.method == "full":
        train_model(kept, base, folder, cfg.train, system_text, cfg.launch)
        return
    from selfalign.train.export import merge_trained

    adapter = ctx.dir / "adapter"
    train_model(kept, base, adapter, cfg.train.model_copy(update={"merge": False}), system_text,
                cfg.launch)  # fmt: skip
    log = train_log(adapter)
    merge = merge_trained(adapter, folder, kept, system_text, method=log["method"],
                          precision=log["precision"])  # fmt: skip
    log["warnings"] = [*log.get("warnings", []), *merge["warnings"]]
    atomic_write_json(folder / TRAIN_LOG, {**log, "merge": merge})


def estimate(cfg: VerboseConfig, ectx: EstimateContext) -> Estimate:
    """One teacher request per prompt (``prompts_from``, ``max_prompts`` at most): the
    verbose prefix, a typical prompt, up to ``max_new_tokens`` back; the student trains
    on at most as many answers."""
    n = ectx.inputs(cfg.prompts_from)
    n = min(n, cfg.max_prompts or n)
    turn = user_turn("") + TURN_SEP + ASSISTANT_TAG + "\n"
    per = ectx.count_tokens(teacher_prefix(cfg) + turn) + ectx.typical_prompt_tokens
    return Estimate(n, n * per, n * cfg.max_new_tokens, train_examples=n, outputs=n,
                    train_tokens=sft_train_tokens(n, cfg.train))  # fmt: skip


STAGE = Stage(
    "verbose",
    VerboseConfig,
    run_verbose,
    inputs=("prompts", "aligned", "engraved"),
    summarize=_summary,
    annotation_files=annotation_files,
    artifact="verbose/model",
    estimate=estimate,
)
