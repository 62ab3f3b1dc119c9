"""Stage 1, ``prompts``: the prompt pool: the user's own prompts (``file``, off by
default), then Self-Instruct, then TGRT; any of the three may be turned off.

Output ``prompts/records.jsonl``, one prompt per line:
``{"id", "instruction", "input", "source": "user_file"|"self_instruct"|"tgrt",
"parents": [ids], "row" (user file) | "round" (self-instruct) | "type", "topic" (TGRT)}``.
Prompts from a file have no parents (``selfalign.stages.user_file``). Parent ids resolve in
``prompts/seeds.jsonl`` (the seed tasks and red-team seeds the run used) or in
``records.jsonl`` itself. Other files: ``dropped.jsonl`` (every rejected candidate with
its reason), ``topics.jsonl`` (TGRT topics), ``rounds.jsonl`` (one line per finished
round). Downstream stages build the user turn with ``prompt_text``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from selfalign.annotations.loaders import (
    DEFAULT_REDTEAM_TYPES,
    DEFAULT_SEED_TASKS,
    load_redteam_types,
    load_seed_tasks,
)
from selfalign.config import StageConfig
from selfalign.stages import user_file
from selfalign.stages.api import ROUNDS, Estimate, EstimateContext, Stage, StageContext
from selfalign.stages.self_instruct import (
    SelfInstructConfig,
    estimate_self_instruct,
    run_self_instruct,
)
from selfalign.stages.tgrt import TOPIC_PHASE, TOPICS, TGRTConfig, estimate_tgrt, run_tgrt
from selfalign.stages.user_file import FileSourceConfig, estimate_user_file, run_user_file
from selfalign.store import stable_hash


def prompt_text(record: dict[str, Any]) -> str:
    """The user turn for a prompt record: the instruction, then the input on a new line."""
    instruction = record["instruction"].strip()
    extra = (record.get("input") or "").strip()
    return f"{instruction}\n{extra}" if extra else instruction


def sample_prompts(records: list[dict[str, Any]], seed: int, key: str = "id") -> list[dict]:
    """``records`` in an order drawn from the run seed and each record's prompt id
    (``key``); callers cap it by taking the first N. Stage 1 writes every self-instruct prompt before
    the TGRT ones, so a cap over the file order would leave out every red-team prompt. The
    order depends only on the seed and the ids: a resumed run sees the same chunks, and
    stages 2 and 4 capped alike answer the same prompts."""
    return sorted(records, key=lambda r: (stable_hash([seed, "prompt order", r[key]]), r[key]))


class PromptsConfig(StageConfig):
    file: FileSourceConfig = Field(default_factory=FileSourceConfig)
    self_instruct: SelfInstructConfig = Field(default_factory=SelfInstructConfig)
    tgrt: TGRTConfig = Field(default_factory=TGRTConfig)

    @model_serializer(mode="wrap")
    def _without_an_unused_file(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave ``file`` out while it is off: it changes nothing then, and the settings of
        runs that do not use it (so their fingerprints) stay as they were before it existed."""
        data = handler(self)
        if not self.file.enabled:
            data.pop("file", None)
        return data


def data_files(cfg: PromptsConfig) -> list[Path]:
    """The user's prompt file (part of the fingerprint; read now, so that a bad file or
    field fails at plan time)."""
    return user_file.data_files(cfg.file)


def annotation_files(cfg: PromptsConfig) -> list[Path]:
    """The seed files the stage reads; loading them here makes a bad file fail at plan
    time (also under ``--dry-run``), as one InputError line naming file and line."""
    files = []
    if cfg.self_instruct.enabled:
        files.append(cfg.self_instruct.seed_tasks or DEFAULT_SEED_TASKS)
        load_seed_tasks(files[-1])
    if cfg.tgrt.enabled:
        files.append(cfg.tgrt.types_file or DEFAULT_REDTEAM_TYPES)
        load_redteam_types(files[-1])
    return files


def summarize(records: list[dict], dropped: list[dict], ctx: StageContext) -> dict[str, Any]:
    rounds = ctx.read_aux(ROUNDS)
    topics = ctx.read_aux(TOPICS)
    cut = {r["id"] for r in dropped if r.get("kind") == "topic"}
    # brainstormed topics kept per type (the seeds' own topics are examples only)
    per_type = Counter(t["type"] for t in topics if t["round"] >= 0 and t["id"] not in cut)
    stats: dict[str, Any] = {}
    sources = ("self_instruct", "tgrt")
    if ctx.config.file.enabled:  # type: ignore[attr-defined]
        sources = (user_file.SOURCE, *sources)
    for source in sources:
        stats[source] = {
            "kept": sum(1 for r in records if r["source"] == source),
            "dropped": dict(Counter(r["reason"] for r in dropped if r["source"] == source)),
        }
    stats["self_instruct"]["rounds"] = sum(1 for r in rounds if r["phase"] == "self_instruct")
    stats["tgrt"].update(
        topic_rounds=sum(1 for r in rounds if r["phase"] == TOPIC_PHASE),
        topics_brainstormed=sum(t["round"] >= 0 for t in topics),
        types=len(per_type),
        types_without_topics=sorted(set(t["type"] for t in topics) - set(per_type)),
        topics_per_type=min(per_type.values(), default=0),
    )
    return stats


def run_prompts(ctx: StageContext):
    cfg: PromptsConfig = ctx.config  # type: ignore[assignment]
    si, tg = cfg.self_instruct, cfg.tgrt
    seeds = load_seed_tasks(si.seed_tasks) if si.enabled else []
    types = load_redteam_types(tg.types_file) if tg.enabled else []
    known = {r["id"] for r in ctx.read_aux("seeds")}
    entries = [
        {"id": s.id, "source": "seed_task", "instruction": s.instruction, "input": s.input}
        for s in seeds
    ] + [
        {"id": t.id, "source": "redteam_seed", "type": t.type, "topic": t.topic,
         "instruction": t.instruction}
        for t in types
    ]  # fmt: skip
    ctx.append_aux("seeds", [e for e in entries if e["id"] not in known])
    if cfg.file.enabled:
        yield from run_user_file(ctx, cfg.file)
    if si.enabled and not (yield from run_self_instruct(ctx, si, seeds)):
        return  # failed requests: the runner marks the stage incomplete
    if tg.enabled:
        yield from run_tgrt(ctx, tg, types)


def estimate(cfg: PromptsConfig, ectx: EstimateContext) -> Estimate:
    """The user file's prompts, Self-Instruct's and TGRT's bounds added (``estimate_*``)."""
    si, tg = cfg.self_instruct, cfg.tgrt
    total = Estimate()
    if cfg.file.enabled:
        total += estimate_user_file(cfg.file, ectx.run.seed)
    if si.enabled:
        total += estimate_self_instruct(si, load_seed_tasks(si.seed_tasks), ectx.count_tokens)
    if tg.enabled:
        total += estimate_tgrt(tg, load_redteam_types(tg.types_file), ectx.count_tokens)
    return total


STAGE = Stage("prompts", PromptsConfig, run_prompts, summarize=summarize,
              annotation_files=annotation_files, data_files=data_files,
              estimate=estimate)  # fmt: skip
