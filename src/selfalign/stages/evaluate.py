"""The ``eval`` stage: multiple-choice benchmarks on the run's models, one JSON each.

Models: ``base`` (the run's model), ``engraved`` (base + stage-3 adapter), ``final``
(``verbose/model``), ``dpo`` (``dpo/model``), ``mote`` (the mote stage's ``train.method``)
and ``mote:{method}`` (any method the mote stage trains, its ablation rows included); MoTE
models on their answers only (held-out, safety). Results land in
``eval/{model}-{benchmark}-{protocol}.json`` in the same format the ``selfalign eval``
commands print, and the report shows them.

``safety``: every model (``mote`` too, through its step-wise decoding) answers each prompt
file, a judge backend reads the replies, and each (model, file) gets MoTE's numbers in
``eval/{model}-safety-{file label}.json`` (see ``selfalign.eval.safety``).

Protocols with a system text (TruthfulQA dromedary, HHH) give each trained model the one
it was trained with (its ``train_log.json``) and the base model a neutral one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from selfalign.backends import BackendConfig
from selfalign.config import StageConfig
from selfalign.errors import StageError
from selfalign.eval.heldout import KINDS
from selfalign.mote.config import TrainMethod
from selfalign.stages.api import Batch, Estimate, EstimateContext, MapWork, Stage, StageContext
from selfalign.stages.training import PLAIN_SYSTEM_TEXT, trained_backend, trained_system_text
from selfalign.store import atomic_write_json
from selfalign.validation import ExistingPath, StrictModel, load_yaml

if TYPE_CHECKING:
    from selfalign.eval.safety import PromptFile, SafetyPrompt

PlainModel = Literal["base", "engraved", "final", "dpo", "mote"]
ModelName = str  # a PlainModel, or "mote:{method}"
MOTE_PREFIX = "mote:"
# the stage that builds each trained model
MODEL_STAGES: dict[str, str] = {
    "engraved": "engraved", "final": "verbose", "dpo": "dpo", "mote": "mote",
}  # fmt: skip


def is_mote(model: ModelName) -> bool:
    return model == "mote" or model.startswith(MOTE_PREFIX)


def _stage_of(model: ModelName) -> str:
    return "mote" if is_mote(model) else MODEL_STAGES[model]


def _check_model(value: Any) -> Any:
    """A plain model name, or ``mote:`` and a training method."""
    from pydantic import TypeAdapter

    if isinstance(value, str) and value.startswith(MOTE_PREFIX):
        TypeAdapter(TrainMethod).validate_python(value.removeprefix(MOTE_PREFIX))
    else:
        TypeAdapter(PlainModel).validate_python(value)
    return value


class TruthfulQASettings(StrictModel):
    data: ExistingPath
    protocols: list[Literal["lm-eval", "dromedary"]] = ["lm-eval", "dromedary"]
    limit: int | None = Field(None, gt=0)


class HHHSettings(StrictModel):
    data: ExistingPath
    limit: int | None = Field(None, gt=0)


class HeldoutSettings(StrictModel):
    """Answers to prompts no stage trained on, side by side in the report."""

    prompts: ExistingPath | None = Field(None, description="JSONL; default: the shipped 24")
    kinds: list[Literal[KINDS]] | None = Field(  # type: ignore[valid-type]
        None, description="only prompts of these kinds (benign, harmful, safe_alarming)"
    )
    max_new_tokens: int = Field(160, gt=0)
    icl: bool = Field(True, description="also the base model under the stage-2 prompt")


class SafetyFileSettings(StrictModel):
    path: ExistingPath
    kind: Literal["benign", "harmful"] | None = Field(
        None,
        description="default: read from the file where its format says it (XSTest labels, "
        "HH-RLHF helpful-base / harmless-base paths, a kind or label per line)",
    )


class SafetySettings(StrictModel):
    """MoTE's Help / Harm / Harm-Help / XSTest: every model answers every prompt file, the
    judge reads the replies; one result per model and file."""

    prompts: list[SafetyFileSettings] = Field(
        min_length=1, description="prompt files: a path, or {path, kind}"
    )
    judge: BackendConfig = Field(description="who reads the replies (a strong model)")
    judge_mode: Literal["generate", "likelihood"] = Field(
        "generate",
        description="generate: the judge writes its verdicts (a chat model); likelihood: "
        "its log-likelihoods of each answer are read (a base model; a backend that scores)",
    )
    limit: int | None = Field(None, gt=0, description="the first N prompts of each file")
    max_new_tokens: int = Field(256, gt=0, description="per answer (mote: the whole chain)")

    @field_validator("prompts", mode="before")
    @classmethod
    def _plain_paths(cls, value: object) -> object:
        if isinstance(value, list):
            return [{"path": v} if isinstance(v, str | Path) else v for v in value]
        return value


class EvalStageConfig(StageConfig):
    models: list[ModelName] = Field(
        ["base", "engraved", "final"],
        description="base, engraved, final (verbose/model), dpo (dpo/model), mote and "
        "mote:{method} (the mote stage's models, on their answers only: heldout, safety)",
    )
    truthfulqa: TruthfulQASettings | None = None
    hhh: HHHSettings | None = None
    heldout: HeldoutSettings | None = None
    safety: SafetySettings | None = None

    @field_validator("models")
    @classmethod
    def _known_models(cls, value: list[str]) -> list[str]:
        for model in value:
            _check_model(model)
        if len(set(value)) < len(value):
            raise ValueError("each model once")
        return value

    @model_validator(mode="after")
    def _mote_answers_only(self) -> EvalStageConfig:
        if any(map(is_mote, self.models)) and (self.truthfulqa or self.hhh):
            raise ValueError("MoTE models are evaluated on their answers only (heldout, safety)")
        return self

    def check_with(self, stages: dict[str, StageConfig]) -> tuple[str, str] | None:
        mote = stages.get("mote")
        trained = mote.methods() if mote is not None else []  # type: ignore[attr-defined]
        for model in self.models:
            method = model.removeprefix(MOTE_PREFIX)
            if model.startswith(MOTE_PREFIX) and method not in trained:
                return "models", (f"{model}: the mote stage does not train {method} "
                                  f"(it trains: {', '.join(trained) or 'nothing'})")  # fmt: skip
        return None


def model_stages(cfg: EvalStageConfig) -> tuple[str, ...]:
    """The stages whose models the config scores: the eval stage's inputs."""
    return tuple(dict.fromkeys(_stage_of(m) for m in cfg.models if m != "base"))


def model_dir(ctx: StageContext, name: ModelName) -> Path:
    """The folder of a trained model (``mote:{method}``: the main model or a row's)."""
    if name.startswith(MOTE_PREFIX):
        from selfalign.stages.mote_stage import row_artifact

        method = name.removeprefix(MOTE_PREFIX)
        rows = (load_yaml(ctx.run_dir / "config.yaml")["stages"]["mote"] or {}).get("rows", [])
        return ctx.artifact("mote", row_artifact(method) if method in rows else None)
    return ctx.artifact(_stage_of(name))


def model_backend(ctx: StageContext, name: ModelName) -> BackendConfig:
    if name == "base":
        return ctx.backend_config()
    return trained_backend(ctx.backend_config(), model_dir(ctx, name))


def model_system_text(ctx: StageContext, name: ModelName) -> str | None:
    """The system text ``name`` was trained with; None for the base model."""
    return None if name == "base" else trained_system_text(model_dir(ctx, name))


def base_system_text(ctx: StageContext, cfg: EvalStageConfig) -> str:
    """What the base model sees in the held-out answers: exactly the system text the
    first trained model was trained with (the prompt it learned to answer), else ours."""
    for name in cfg.models:
        if name != "base" and (text := model_system_text(ctx, name)):
            return text
    return PLAIN_SYSTEM_TEXT.replace("{name}", ctx.run.assistant_name)


def _summary(records: list[dict], dropped: list[dict], ctx: StageContext) -> dict:
    return {r["name"]: {m["metric"]: m["value"] for m in r["metrics"]} for r in records}


def _data_files(cfg: EvalStageConfig) -> list[Path]:
    files = [s.data for s in (cfg.truthfulqa, cfg.hhh) if s is not None]
    if cfg.heldout is not None:
        from selfalign.eval.heldout import HELDOUT_PROMPTS, load_heldout

        files.append(cfg.heldout.prompts or HELDOUT_PROMPTS)
        load_heldout(files[-1])  # a bad file fails at plan time, not after training
    if cfg.safety is not None:
        from selfalign.eval.safety import load_file

        for file in safety_files(cfg):
            load_file(file)  # an unknown kind fails at plan time too
            files.append(file.path)
    return files


def safety_files(cfg: EvalStageConfig) -> list[PromptFile]:
    """The safety block's prompt files, each with its label and stated kind."""
    from selfalign.eval.safety import PromptFile, file_labels

    settings: SafetySettings = cfg.safety  # type: ignore[assignment]
    paths = [f.path for f in settings.prompts]
    return [
        PromptFile(f.path, label, f.kind)
        for f, label in zip(settings.prompts, file_labels(paths), strict=True)
    ]


def safety_answers(
    ctx: StageContext, cfg: EvalStageConfig, model: ModelName, prompts: list[SafetyPrompt]
) -> list[str]:
    """``model``'s answers to safety prompts, prompted as for the held-out answers (MoTE
    by its adaptive step-wise decoding: the answer step's text)."""
    from selfalign.eval.heldout import answer_heldout, answer_heldout_mote

    budget = cfg.safety.max_new_tokens  # type: ignore[union-attr]
    rows = [{"id": p.pid, "kind": p.kind, "prompt": p.prompt} for p in prompts]
    if is_mote(model):
        ctx.close()  # one model in memory at a time
        answered = answer_heldout_mote(
            model_dir(ctx, model), rows, budget, batch_size=ctx.backend_config().batch_size
        )
    else:
        answered = answer_heldout(
            ctx.backend(model_backend(ctx, model), alone=True), rows,
            system_text=model_system_text(ctx, model) or base_system_text(ctx, cfg),
            max_new_tokens=budget, chat=model in ("engraved", "final", "dpo"),
        )  # fmt: skip
    return [r["answer"] for r in answered]


def safety_job(ctx: StageContext, cfg: EvalStageConfig, model: ModelName, label: str) -> dict:
    """``model`` answers one prompt file, then the judge reads every reply (judgments kept
    in ``{result}.records.jsonl``, so a killed stage judges only what is left)."""
    from selfalign.backends import parse_spec
    from selfalign.eval.resume import model_identity
    from selfalign.eval.safety import load_file, run_safety, summarize

    settings: SafetySettings = cfg.safety  # type: ignore[assignment]
    file = next(f for f in safety_files(cfg) if f.label == label)
    prompts = load_file(file)[: settings.limit]
    answers = safety_answers(ctx, cfg, model, prompts)
    answered = [replace(p, answer=a) for p, a in zip(prompts, answers, strict=True)]
    remote = parse_spec(settings.judge.model).kind == "openai"
    judge = ctx.backend(settings.judge, alone=not remote)
    if settings.judge_mode == "likelihood" and not judge.can_score:
        raise StageError(f"eval.safety.judge_mode likelihood: the judge's {judge.name} "
                         "backend cannot score continuations")  # fmt: skip
    done, ids, failed = run_safety(
        None, judge, answered, model_name=None,
        judge_name=model_identity(settings.judge.model),
        records=ctx.dir / f"{model}-safety-{label}.records.jsonl",
        batch_size=settings.judge.batch_size, judge_mode=settings.judge_mode,
    )  # fmt: skip
    if failed:
        raise StageError(f"{failed} safety judgment(s) failed; run again to finish them")
    result = summarize(done, ids, answered, [file], model=model, judge=settings.judge.model,
                       judge_mode=settings.judge_mode)  # fmt: skip
    return result.as_dict()


def stage_prompt(ctx: StageContext):
    """Stage 2's in-context prompt, from the run's resolved config (``config.yaml``)."""
    from selfalign.stages.aligned import AlignedConfig, build

    stages = load_yaml(ctx.run_dir / "config.yaml")["stages"]
    return build(AlignedConfig.model_validate(stages.get("aligned") or {}))[0]


def heldout_job(ctx: StageContext, cfg: EvalStageConfig, model: str) -> dict:
    """Answers of ``model`` to the held-out prompts, with their metrics."""
    from selfalign.eval.heldout import answer_heldout, heldout_metrics, load_heldout

    settings: HeldoutSettings = cfg.heldout  # type: ignore[assignment]
    prompts = load_heldout(settings.prompts)
    if settings.kinds is not None:
        prompts = [p for p in prompts if p["kind"] in settings.kinds]
    if is_mote(model):
        from selfalign.eval.heldout import answer_heldout_mote

        ctx.close()  # one model in memory at a time
        rows = answer_heldout_mote(
            model_dir(ctx, model), prompts, settings.max_new_tokens,
            batch_size=ctx.backend_config().batch_size,
        )  # fmt: skip
    else:
        source: ModelName = "base" if model == "base_icl" else model  # type: ignore[assignment]
        rows = answer_heldout(
            ctx.backend(model_backend(ctx, source), alone=True), prompts,
            system_text=model_system_text(ctx, source) or base_system_text(ctx, cfg),
            max_new_tokens=settings.max_new_tokens,
            icl=stage_prompt(ctx) if model == "base_icl" else None,
            chat=model in ("engraved", "final", "dpo"),
        )  # fmt: skip
    metrics = heldout_metrics(rows)
    return {"benchmark": "heldout", "protocol": "greedy", "model": model, "metrics": metrics,
            "answers": rows}  # fmt: skip


Job = tuple[ModelName, str, str, str]  # (model whose backend runs it, name, benchmark, protocol)


def eval_jobs(cfg: EvalStageConfig) -> dict[str, Job]:
    """Every (model, benchmark, protocol) the config asks for, by result name, one model's
    jobs together (its backend is loaded once)."""
    jobs: list[Job] = []
    for model in cfg.models:
        if cfg.heldout is not None:
            jobs.append((model, model, "heldout", "greedy"))
            if model == "base" and cfg.heldout.icl:
                jobs.append((model, "base_icl", "heldout", "greedy"))
        if cfg.truthfulqa is not None:
            for protocol in cfg.truthfulqa.protocols:
                jobs.append((model, model, "truthfulqa", protocol))
        if cfg.hhh is not None:
            jobs.append((model, model, "hhh", "both-orders"))
        if cfg.safety is not None:  # protocol slot: the prompt file's label
            for file in safety_files(cfg):
                jobs.append((model, model, "safety", file.label))
    return {f"{name}-{benchmark}-{protocol}": (model, name, benchmark, protocol)
            for model, name, benchmark, protocol in jobs}  # fmt: skip


def run_eval(ctx: StageContext) -> Iterator[MapWork]:
    from selfalign.eval.hhh import HHH_SYSTEM, evaluate_hhh
    from selfalign.eval.truthfulqa import DROMEDARY_SYSTEM, evaluate_truthfulqa

    cfg: EvalStageConfig = ctx.config  # type: ignore[assignment]

    def run_job(job: Job) -> dict:
        model, name, benchmark, protocol = job
        if benchmark == "heldout":
            return heldout_job(ctx, cfg, name)
        if benchmark == "safety":
            return safety_job(ctx, cfg, model, protocol)
        backend = ctx.backend(model_backend(ctx, model), alone=True)
        system = model_system_text(ctx, model)
        if benchmark == "truthfulqa":
            return evaluate_truthfulqa(
                backend, cfg.truthfulqa.data, model=model, protocol=protocol,
                limit=cfg.truthfulqa.limit, system=system or DROMEDARY_SYSTEM,
            )[0].as_dict()  # fmt: skip
        return evaluate_hhh(
            backend, cfg.hhh.data, model=model, limit=cfg.hhh.limit, system=system or HHH_SYSTEM
        )[0].as_dict()

    def run_jobs(chunk: list[tuple[str, Job]]) -> Batch:
        batch = Batch()
        for result_name, job in chunk:
            data = run_job(job)
            atomic_write_json(ctx.dir / f"{result_name}.json", data)
            record = {k: v for k, v in data.items() if k != "answers"}
            batch.keep.append({"id": result_name, "name": result_name, **record})
        return batch

    yield MapWork(eval_jobs(cfg), 1, run_jobs)


SAMPLE = 32  # benchmark items whose tokens are counted; the rest are taken to be of their mean


def _scaled(rows: list, per_row) -> tuple[int, int]:
    """(requests, prompt tokens) over ``rows``, counted on a sample and scaled up."""
    sample = rows[:SAMPLE]
    if not sample:
        return 0, 0
    counted = [per_row(r) for r in sample]
    scale = len(rows) / len(sample)
    return round(sum(c[0] for c in counted) * scale), round(sum(c[1] for c in counted) * scale)


def _job_estimate(cfg: EvalStageConfig, job: Job, ectx: EstimateContext) -> Estimate:
    from selfalign.chat_format import render_prompt

    model, name, benchmark, protocol = job
    count = ectx.count_tokens
    if benchmark == "safety":
        return _safety_estimate(cfg, protocol, ectx)
    if benchmark == "heldout":
        from selfalign.eval.heldout import THOUGHTS_TOKENS, load_heldout

        settings: HeldoutSettings = cfg.heldout  # type: ignore[assignment]
        prompts = [p for p in load_heldout(settings.prompts)
                   if settings.kinds is None or p["kind"] in settings.kinds]  # fmt: skip
        system = PLAIN_SYSTEM_TEXT.replace("{name}", ectx.run.assistant_name)
        budget = settings.max_new_tokens
        if name == "base_icl":
            from selfalign.stages.aligned import AlignedConfig, build

            icl = build(AlignedConfig())[0]
            per = [count(icl.prefix() + icl.query_prompt(p["prompt"])) for p in prompts]
            budget += THOUGHTS_TOKENS
        else:
            per = [count(render_prompt(system, p["prompt"])) for p in prompts]
        return Estimate(len(per), sum(per), len(per) * budget)
    if benchmark == "truthfulqa":
        from selfalign.eval.truthfulqa import (
            FALSE,
            TARGET_DELIMITER,
            TRUE,
            dromedary_context,
            lm_eval_context,
            load_truthfulqa,
        )

        settings_q: TruthfulQASettings = cfg.truthfulqa  # type: ignore[assignment]
        questions = load_truthfulqa(settings_q.data)[: settings_q.limit]
        if protocol == "lm-eval":

            def row(q):  # each distinct choice scored once after the question's context
                choices = set(q.mc1_choices) | set(q.mc2_choices)
                context = count(lm_eval_context(q.question))
                return len(choices), sum(context + count(TARGET_DELIMITER + c) for c in choices)
        else:

            def row(q):  # " true" and " false" after each MC1 candidate
                return 2 * len(q.mc1_choices), sum(
                    count(dromedary_context(q.question, c)) + count(w)
                    for c in q.mc1_choices
                    for w in (TRUE, FALSE)
                )

        requests, prompt = _scaled(questions, row)
        return Estimate(requests, prompt)
    from selfalign.eval.hhh import LETTERS, hhh_context, load_hhh

    settings_h: HHHSettings = cfg.hhh  # type: ignore[assignment]
    examples = load_hhh(settings_h.data)[: settings_h.limit]
    requests, prompt = _scaled(  # both orders, each letter scored after each
        examples,
        lambda ex: (4, 2 * sum(count(hhh_context(ex.input, *ex.responses)) + count(w)
                               for w in LETTERS)),
    )  # fmt: skip
    return Estimate(requests, prompt)


def _safety_estimate(cfg: EvalStageConfig, label: str, ectx: EstimateContext) -> Estimate:
    """One file: an answer per prompt (up to ``max_new_tokens``), then a judgment of it
    (the judge backend's share counted here too)."""
    from selfalign.chat_format import render_prompt
    from selfalign.eval.safety import JUDGE_MAX_NEW_TOKENS, SAFETY_JUDGE_SYSTEM, load_file

    settings: SafetySettings = cfg.safety  # type: ignore[assignment]
    file = next(f for f in safety_files(cfg) if f.label == label)
    prompts = load_file(file)[: settings.limit]
    system = PLAIN_SYSTEM_TEXT.replace("{name}", ectx.run.assistant_name)
    budget = settings.max_new_tokens
    if settings.judge_mode == "likelihood":  # one scored request per answer to each question
        from selfalign.eval.safety_likelihood import QUESTIONS, question_context

        asks = [(q, len(answers)) for q, answers in QUESTIONS.values()]
        judge_requests = sum(n for _, n in asks)

        def judge_tokens(p: SafetyPrompt) -> int:
            return sum(n * (ectx.count_tokens(question_context(p.prompt, "", q)) + budget)
                       for q, n in asks)  # fmt: skip

        judge_completion = 0
    else:
        judge_head = ectx.count_tokens(SAFETY_JUDGE_SYSTEM)
        judge_requests, judge_completion = 1, JUDGE_MAX_NEW_TOKENS

        def judge_tokens(p: SafetyPrompt) -> int:
            return judge_head + ectx.count_tokens(p.prompt) + budget

    requests, prompt = _scaled(
        prompts,
        lambda p: (1 + judge_requests,
                   ectx.count_tokens(render_prompt(system, p.prompt)) + judge_tokens(p)),
    )  # fmt: skip
    return Estimate(requests, prompt, len(prompts) * (budget + judge_completion))


def estimate(cfg: EvalStageConfig, ectx: EstimateContext) -> Estimate:
    """Held-out answers (up to ``max_new_tokens`` each, the stage-2 prompt's thoughts on
    top for ``base_icl``) and scored benchmarks (no tokens generated), per model; one
    result each."""
    jobs = eval_jobs(cfg)
    parts = {name: _job_estimate(cfg, job, ectx) for name, job in jobs.items()}
    total = sum(parts.values(), Estimate(outputs=len(jobs)))
    scored = sum(
        e.requests for name, e in parts.items() if jobs[name][2] not in ("heldout", "safety")
    )
    if scored:
        note = f"{scored:,} scored requests generate nothing: their time is not estimated"
        return replace(total, note=note)
    return total


STAGE = Stage(
    "eval",
    EvalStageConfig,
    run_eval,
    inputs_of=model_stages,
    summarize=_summary,
    data_files=_data_files,
    estimate=estimate,
)
