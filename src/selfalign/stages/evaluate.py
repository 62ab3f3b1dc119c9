"""The ``eval`` stage: multiple-choice benchmarks on the run's models, one JSON each.

Models: ``base`` (the run's model), ``engraved`` (base + stage-3 adapter) and ``final``
(``verbose/model``). Results land in ``eval/{model}-{benchmark}-{protocol}.json`` in the
same format the ``selfalign eval`` commands print, and the report shows them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import Field

from selfalign.backends import BackendConfig
from selfalign.config import ExistingPath, StageConfig, StrictModel
from selfalign.pipeline import Batch, StageContext, stage
from selfalign.store import atomic_write_json

ModelName = Literal["base", "engraved", "final"]


class TruthfulQASettings(StrictModel):
    data: ExistingPath
    protocols: list[Literal["lm-eval", "dromedary"]] = ["lm-eval", "dromedary"]
    limit: int | None = Field(None, gt=0)


class HHHSettings(StrictModel):
    data: ExistingPath
    limit: int | None = Field(None, gt=0)


class EvalStageConfig(StageConfig):
    models: list[ModelName] = ["base", "engraved", "final"]
    truthfulqa: TruthfulQASettings | None = None
    hhh: HHHSettings | None = None


def model_backend(ctx: StageContext, name: ModelName) -> BackendConfig:
    base = ctx.backend_config()
    if name == "engraved":
        merged = ctx.run_dir / "engraved" / "merged"
        if merged.is_dir():
            return base.model_copy(update={"model": str(merged)})
        return base.model_copy(update={"adapter": str(ctx.run_dir / "engraved")})
    if name == "final":
        return base.model_copy(update={"model": str(ctx.run_dir / "verbose" / "model")})
    return base


def _summary(records: list[dict], dropped: list[dict], ctx: StageContext) -> dict:
    return {r["name"]: {m["metric"]: m["value"] for m in r["metrics"]} for r in records}


def _data_files(cfg: EvalStageConfig) -> list[Path]:
    return [s.data for s in (cfg.truthfulqa, cfg.hhh) if s is not None]


@stage(
    "eval",
    config=EvalStageConfig,
    inputs=("engraved", "verbose"),
    summarize=_summary,
    data_files=_data_files,
)
def run_eval(ctx: StageContext) -> Iterator[Batch]:
    from selfalign.eval.hhh import evaluate_hhh
    from selfalign.eval.truthfulqa import evaluate_truthfulqa

    cfg: EvalStageConfig = ctx.config  # type: ignore[assignment]
    jobs = []
    for model in cfg.models:
        if cfg.truthfulqa is not None:
            for protocol in cfg.truthfulqa.protocols:
                jobs.append((model, "truthfulqa", protocol))
        if cfg.hhh is not None:
            jobs.append((model, "hhh", "both-orders"))
    ctx.set_total(len(jobs))
    for model in cfg.models:
        todo = [j for j in jobs if j[0] == model and "-".join(j) not in ctx.done_ids]
        if not todo:
            continue
        backend = ctx.backend(model_backend(ctx, model))
        for _, benchmark, protocol in todo:
            if benchmark == "truthfulqa":
                result, _ = evaluate_truthfulqa(
                    backend, cfg.truthfulqa.data, model=model, protocol=protocol,
                    limit=cfg.truthfulqa.limit,
                )  # fmt: skip
            else:
                result, _ = evaluate_hhh(backend, cfg.hhh.data, model=model, limit=cfg.hhh.limit)
            name = f"{model}-{benchmark}-{protocol}"
            data = result.as_dict()
            atomic_write_json(ctx.dir / f"{name}.json", data)
            yield Batch(keep=[{"id": name, "name": name, **data}])
        ctx.close()
