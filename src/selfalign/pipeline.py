"""The runner: caching, resume, progress and the manifest for every stage.

A stage (``selfalign.stages.api``) yields units of work; the runner drives each kind the
same way for every stage: it appends a batch's records to ``STAGE/records.jsonl`` and
``STAGE/dropped.jsonl`` (the batch is the unit of commit) and skips ids already written;
it runs a ``MapWork`` over fixed chunk boundaries, showing progress; it marks a loop's
finished ``Round``; it builds an ``Artifact`` in a work folder under ``RUN_DIR/.build`` and
renames it into place. ``manifest.json`` stays current throughout.

Fingerprints: a stage's fingerprint hashes its settings, its backend's output-relevant
settings, the run's seed and model, the annotation files it reads, and its inputs'
fingerprints, so a change re-runs that stage and everything downstream, nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml

from selfalign.chunking import pending_chunks
from selfalign.config import RunConfig, StageConfig
from selfalign.cost import stage_cost
from selfalign.environment import note_environment
from selfalign.errors import InputError
from selfalign.progress import ProgressReporter
from selfalign.registry import load_stage, stage_names
from selfalign.stages.api import (
    DROPPED,
    MANIFEST,
    RECORDS,
    ROUNDS,
    Artifact,
    Batch,
    MapWork,
    Round,
    Stage,
    StageContext,
    add_usage,
)
from selfalign.store import (
    JsonlWriter,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    read_records,
    record_id,
    stable_hash,
)

BUILD_DIR = ".build"  # work folders of artifacts being built, kept across a kill


class StageIncomplete(Exception):
    """Some requests of a stage failed after all retries; running again retries them."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


_STATUS = Path("/proc/self/status")


def reset_peak_memory() -> None:
    """Start a stage's peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
    with contextlib.suppress(OSError):  # not Linux: the peak is then the process's so far
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb() -> float | None:
    """Peak resident memory of this process since the last reset, in MiB."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource  # fallback: the process's lifetime peak (bytes on macOS, KiB elsewhere)

    unit = 1024 * 1024 if sys.platform == "darwin" else 1024
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit, 1)


class Manifest:
    """``manifest.json``: per stage status, fingerprint, counts, drop reasons, timings."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / MANIFEST
        self.data: dict[str, Any] = {"stages": {}}
        if self.path.exists():
            self.data = json.loads(self.path.read_text(encoding="utf-8"))

    def entry(self, name: str) -> dict[str, Any] | None:
        return self.data["stages"].get(name)

    def update(self, name: str, **values: Any) -> None:
        self.data["stages"].setdefault(name, {}).update(values)
        atomic_write_json(self.path, self.data)


Action = Literal["reuse", "resume", "run", "rerun"]


@dataclass
class PlanItem:
    stage: Stage
    config: StageConfig
    fingerprint: str
    action: Action
    reason: str


class Runner:
    def __init__(
        self,
        run: RunConfig,
        stage_configs: dict[str, StageConfig],
        run_dir: Path,
        config_file: Path,
        stages: dict[str, Stage] | None = None,
    ) -> None:
        """``stages``: the stages to run, upstream first (default: the built-in ones the
        config names)."""
        self.run, self.stage_configs = run, stage_configs
        self.run_dir, self.config_file = Path(run_dir), config_file
        if stages is None:
            stages = {n: load_stage(n) for n in stage_names() if n in stage_configs}
        self.stages = stages
        self.manifest = Manifest(self.run_dir)

    # -- planning -----------------------------------------------------------------------
    def fingerprint(self, stage: Stage, config: StageConfig, upstream: dict[str, str]) -> str:
        backend = config.backend or self.run.generation_backend()
        files = stage.annotation_files(config) if stage.annotation_files else []
        data = stage.data_files(config) if stage.data_files else []
        parts = {
            "stage": stage.name,
            "version": stage.version,
            "config": config.model_dump(mode="json", exclude={"backend"}),
            "backend": backend.fingerprint_data(),
            "seed": self.run.seed,
            "model": self.run.model,
            "inputs": {name: upstream[name] for name in stage.needs(config)},
            "annotations": {str(p): file_sha256(p) for p in files},
        }
        if data:  # only where a stage reads data files: other fingerprints stay as they were
            parts["data"] = {str(p): file_sha256(p) for p in data}
        return stable_hash(parts)

    def plan(self, only: str | None = None, until: str | None = None) -> list[PlanItem]:
        for flag, name in (("--only", only), ("--until", until)):
            if name is not None and name not in self.stage_configs:
                raise InputError(f"stage {name!r} is not in the config", field=flag)
        items: list[PlanItem] = []
        fps: dict[str, str] = {}
        for name, stage in self.stages.items():
            if name not in self.stage_configs:
                continue
            for dep in stage.needs(self.stage_configs[name]):
                if dep not in self.stage_configs:
                    raise InputError(
                        f"needs stage {dep!r}, which is not configured",
                        file=self.config_file, field=f"stages.{name}",
                    )  # fmt: skip
            config = self.stage_configs[name]
            fp = fps[name] = self.fingerprint(stage, config, fps)
            items.append(PlanItem(stage, config, fp, *self._action(name, fp)))
        if only is not None:
            needs = self.stages[only].needs(self.stage_configs[only])
            upstream = [i for i in items if i.stage.name in needs]
            for item in upstream:
                if item.action != "reuse":
                    raise InputError(
                        f"stage {only!r} needs {item.stage.name!r} complete first "
                        f"({item.reason}); run without --only",
                        field="--only",
                    )
            items = [i for i in items if i.stage.name == only]
        elif until is not None:
            names = list(self.stages)
            items = [i for i in items if names.index(i.stage.name) <= names.index(until)]
        return items

    def _action(self, name: str, fp: str) -> tuple[Action, str]:
        entry = self.manifest.entry(name)
        if entry is None:
            return "run", "not run yet"
        if entry.get("fingerprint") != fp:
            return "rerun", "settings, inputs or annotations changed"
        if entry.get("status") == "complete":
            return "reuse", f"complete ({entry.get('counts', {}).get('out', 0)} records)"
        done = len(read_records(self.run_dir / name / RECORDS))
        return "resume", f"{entry.get('status')}, {done} records already written"

    # -- running ------------------------------------------------------------------------
    def write_config(self) -> None:
        data = self.run.model_dump(mode="json")
        data["stages"] = {
            name: cfg.model_dump(mode="json") for name, cfg in self.stage_configs.items()
        }
        atomic_write_text(self.run_dir / "config.yaml", yaml.safe_dump(data, sort_keys=False))

    def execute(self, plan: list[PlanItem]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.write_config()
        for item in plan:
            if item.action == "reuse":
                print(f"[{item.stage.name}] reuse: {item.reason}", file=sys.stderr)
                continue
            self._run_stage(item)

    def _run_stage(self, item: PlanItem) -> None:
        stage, name = item.stage, item.stage.name
        if item.action == "rerun":
            shutil.rmtree(self.run_dir / name, ignore_errors=True)
            shutil.rmtree(self.run_dir / BUILD_DIR / name, ignore_errors=True)
            prior_seconds = 0.0
        else:
            prior_seconds = (self.manifest.entry(name) or {}).get("timings", {}).get("seconds", 0.0)
        if item.action in ("run", "rerun"):
            self.manifest.data["stages"].pop(name, None)
        self.manifest.update(
            name, status="running", fingerprint=item.fingerprint, error=None,
            timings={"started": _now(), "seconds": prior_seconds},
            environment=note_environment(self.manifest.data),  # selfalign.environment
        )  # fmt: skip
        t0 = time.monotonic()
        reset_peak_memory()
        ctx = StageContext(
            stage, item.config, self.run, self.run_dir, item.fingerprint, self.manifest.data
        )
        drive = _Drive(self, ctx)
        with ProgressReporter(name, total=0, done=len(ctx.done_ids)) as drive.progress:
            try:
                for work in stage.run(ctx):
                    drive(work)
            except BaseException as e:
                ctx.close()
                error = f"{type(e).__name__}: {e}"
                self._finish(ctx, drive, t0, prior_seconds, status="failed", error=error)
                raise
            ctx.close()
        if ctx.failures:
            n = sum(ctx.failures.values())
            error = f"{n} requests failed ({', '.join(ctx.failures)}); run again to retry them"
            self._finish(ctx, drive, t0, prior_seconds, status="incomplete", error=error)
            raise StageIncomplete(f"stage {name!r}: {error}")
        self._finish(ctx, drive, t0, prior_seconds, status="complete", error=None)
        from selfalign.cards import write_cards  # model and dataset cards: selfalign.cards

        write_cards(self.run_dir, self.manifest.data)

    def _finish(
        self,
        ctx: StageContext,
        drive: _Drive,
        t0: float,
        prior: float,
        *,
        status: str,
        error: str | None,
    ) -> None:
        name = ctx.name
        entry = self.manifest.entry(name) or {}
        timings = dict(entry.get("timings", {}))
        timings["seconds"] = round(prior + time.monotonic() - t0, 3)
        if status == "complete":
            timings["finished"] = _now()
        peak = peak_memory_mb()
        if peak is not None:  # of this run of the stage (a resumed stage: its last run)
            timings["peak_rss_mb"] = peak
        usage = add_usage(dict(entry.get("usage", {})), ctx.usage)
        made = len(ctx.records) + len(ctx.dropped)  # every item ends kept or dropped
        values: dict[str, Any] = dict(
            status=status,
            error=error,
            timings=timings,
            usage=usage,
            counts={
                "in": (made if status == "complete" else max(made, drive.progress.total))
                or drive.examples,
                "out": len(ctx.records),
                "dropped": len(ctx.dropped),
                "failed": sum(ctx.failures.values()),
            },
            drop_reasons=dict(Counter(r["reason"] for r in ctx.dropped).most_common()),
            failure_reasons=dict(ctx.failures),
        )
        if status == "complete" and ctx.stage.summarize is not None:
            values["stats"] = ctx.stage.summarize(ctx.records, ctx.dropped, ctx)
        values["cost"] = stage_cost(  # tokens, time, device-hours, money: selfalign.cost
            {**entry, **values}, ctx.config.model_dump(mode="json"), self.run.generation_backend()
        )
        self.manifest.update(name, **values)


class _Drive:
    """Carries out the work a stage yields, one kind at a time (see ``stages.api``)."""

    progress: ProgressReporter

    def __init__(self, runner: Runner, ctx: StageContext) -> None:
        self.runner, self.ctx = runner, ctx
        self.examples = 0  # training examples of an artifact: the stage's ``in`` count
        self._writers: dict[str, JsonlWriter] = {}
        self._round_items: dict[str, list[int]] = {}  # items per round, by phase

    def __call__(self, work: Batch | MapWork | Round | Artifact) -> None:
        if isinstance(work, Batch):
            self.commit(work)
        elif isinstance(work, MapWork):
            self.map(work)
        elif isinstance(work, Round):
            self.round(work)
        elif isinstance(work, Artifact):
            self.build(work)
        else:
            raise TypeError(f"stage {self.ctx.name!r} yielded {type(work).__name__}")

    def _writer(self, file: str) -> JsonlWriter:
        if file not in self._writers:  # opened on first use: cuts a torn tail, then appends
            self._writers[file] = JsonlWriter(self.ctx.dir / file)
        return self._writers[file]

    def commit(self, batch: Batch) -> None:
        ctx = self.ctx
        keep = [r for r in batch.keep if r["id"] not in ctx.done_ids]
        ctx.done_ids.update(r["id"] for r in keep)
        drop = [
            {"id": r["id"], "reason": why, **{k: v for k, v in r.items() if k != "id"}}
            for r, why in batch.drop
            if r["id"] not in ctx.done_ids
        ]
        ctx.done_ids.update(r["id"] for r in drop)
        if keep:
            self._writer(RECORDS).append(keep)
        if drop:
            self._writer(DROPPED).append(drop)
        ctx.records.extend(keep)
        ctx.dropped.extend(drop)
        ctx.failures.update(why for _, why in batch.failed)
        self.progress.advance(len(keep) + len(drop) + len(batch.failed))

    def map(self, work: MapWork) -> None:
        chunks = list(pending_chunks(list(work.items), self.ctx.done_ids, work.chunk_size))
        self.progress.set_total(self.progress.done + sum(map(len, chunks)))
        if chunks and work.start is not None:
            work.start()
        for chunk in chunks:
            self.commit(work.process([(i, work.items[i]) for i in chunk]))

    def round(self, work: Round) -> None:
        batch = work.batch
        items = len(batch.keep) + len(batch.drop)
        sizes = self._round_items.setdefault(work.phase, [])
        sizes.append(items)  # estimate first, so the commit's progress line has a total
        self.progress.set_total(self.progress.done + items + work.left * sum(sizes) // len(sizes))
        self.commit(batch)
        if batch.failed:  # a round is all or nothing: the next run redoes it
            return
        marker = {"id": record_id("round", work.phase, work.number), "phase": work.phase,
                  "round": work.number, **work.info, "kept": len(batch.keep),
                  "dropped": len(batch.drop)}  # fmt: skip
        self._writer(f"{ROUNDS}.jsonl").append([marker])

    def build(self, work: Artifact) -> None:
        ctx, artifact = self.ctx, work.path or self.ctx.stage.artifact
        if artifact is None:
            raise TypeError(f"stage {ctx.name!r} builds a model but declares no artifact path")
        if work.path is None:
            self.examples = work.examples
        final = ctx.run_dir / artifact
        folder = ctx.run_dir / BUILD_DIR / artifact
        entry = self.runner.manifest.entry(ctx.name) or {}
        built = artifact in entry.get("artifacts", []) if work.path else entry.get("artifact")
        if built or (final.is_dir() and not folder.exists()):  # (a kill may have come
            self._record_artifact(work, artifact)  # before the manifest)
            return
        ctx.close()  # free the generation models before training
        folder.mkdir(parents=True, exist_ok=True)
        work.build(folder)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.is_dir():
            shutil.rmtree(final)  # only ever a folder nothing was renamed into yet
        os.replace(folder, final)
        _fsync_dir(final.parent)
        self._record_artifact(work, artifact)

    def _record_artifact(self, work: Artifact, artifact: str) -> None:
        """The stage's own model as ``artifact``, a further one listed in ``artifacts``."""
        manifest, name = self.runner.manifest, self.ctx.name
        if work.path is None:
            manifest.update(name, artifact=artifact)
            return
        listed = (manifest.entry(name) or {}).get("artifacts", [])
        if artifact not in listed:
            manifest.update(name, artifacts=[*listed, artifact])


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
