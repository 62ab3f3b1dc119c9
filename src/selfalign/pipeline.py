"""Stages and the runner that owns caching, resume, progress and the manifest.

A stage is a generator function of a ``StageContext`` that yields ``Batch``es of kept
and dropped records. The runner appends each batch to ``STAGE/records.jsonl`` and
``STAGE/dropped.jsonl`` (the batch is the unit of commit), skips ids already written,
and keeps ``manifest.json`` current. A stage resumes by looking at ``ctx.done_ids``.

Fingerprints: a stage's fingerprint hashes its settings, its backend's output-relevant
settings, the run's seed and model, the annotation files it reads, and its inputs'
fingerprints, so a change re-runs that stage and everything downstream, nothing else.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml

from selfalign.backends import Backend, BackendConfig, load_backend
from selfalign.config import RunConfig, StageConfig
from selfalign.errors import InputError
from selfalign.progress import ProgressReporter
from selfalign.store import JsonlLog, atomic_write_json, atomic_write_text, file_sha256, stable_hash

RECORDS, DROPPED, MANIFEST = "records.jsonl", "dropped.jsonl", "manifest.json"


@dataclass
class Batch:
    """What a stage yields: records to keep, (record, reason) pairs it dropped, and
    (record, reason) pairs whose request failed. Failed ones are not committed: the
    stage ends ``incomplete`` and the next run asks for them again."""

    keep: list[dict[str, Any]] = field(default_factory=list)
    drop: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    failed: list[tuple[dict[str, Any], str]] = field(default_factory=list)


class StageIncomplete(Exception):
    """Some requests of a stage failed after all retries; running again retries them."""


StageFn = Callable[["StageContext"], Iterator[Batch]]


@dataclass
class Stage:
    name: str  # also the stage's folder in the run directory
    config_cls: type[StageConfig]
    run: StageFn
    inputs: tuple[str, ...] = ()
    # (kept records, dropped records, ctx) -> stats merged into the manifest entry
    summarize: Callable[[list[dict], list[dict], StageContext], dict[str, Any]] | None = None
    # settings -> the human-written files the stage reads (part of its fingerprint)
    annotation_files: Callable[[Any], list[Path]] | None = None
    # settings -> the data files the stage reads (hashed too, not counted as annotations)
    data_files: Callable[[Any], list[Path]] | None = None
    version: int = 1


_REGISTRY: dict[str, Stage] = {}


def stage(
    name: str,
    *,
    config: type[StageConfig],
    inputs: tuple[str, ...] = (),
    summarize: Callable[..., dict[str, Any]] | None = None,
    annotation_files: Callable[[Any], list[Path]] | None = None,
    data_files: Callable[[Any], list[Path]] | None = None,
    version: int = 1,
) -> Callable[[StageFn], StageFn]:
    """Register a stage function under ``name``."""

    def register(fn: StageFn) -> StageFn:
        _REGISTRY[name] = Stage(
            name, config, fn, inputs, summarize, annotation_files, data_files, version
        )
        return fn

    return register


def registered_stages() -> dict[str, Stage]:
    """All stages, upstream before downstream."""
    import selfalign.stages  # noqa: F401  (registers the built-in stages)

    ordered: dict[str, Stage] = {}

    def visit(name: str) -> None:
        if name in ordered:
            return
        for dep in _REGISTRY[name].inputs:
            if dep in _REGISTRY:
                visit(dep)
        ordered[name] = _REGISTRY[name]

    for name in _REGISTRY:
        visit(name)
    return ordered


def _add_usage(total: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """Add backend counters (numbers, and dicts of counts per reason) into ``total``."""
    for key, value in more.items():
        if isinstance(value, dict):
            merged = Counter(total.get(key, {}))
            merged.update(value)
            total[key] = dict(merged)
        else:
            total[key] = total.get(key, 0) + value
    return total


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
            import json

            self.data = json.loads(self.path.read_text(encoding="utf-8"))

    def entry(self, name: str) -> dict[str, Any] | None:
        return self.data["stages"].get(name)

    def update(self, name: str, **values: Any) -> None:
        self.data["stages"].setdefault(name, {}).update(values)
        atomic_write_json(self.path, self.data)


class StageContext:
    """Everything a stage may use; the runner owns files, resume and progress."""

    def __init__(
        self,
        stage: Stage,
        config: StageConfig,
        run: RunConfig,
        run_dir: Path,
        fingerprint: str,
        progress: ProgressReporter,
    ) -> None:
        self.stage, self.config, self.run, self.run_dir = stage, config, run, run_dir
        self.name, self.fingerprint, self._progress = stage.name, fingerprint, progress
        self.dir = run_dir / stage.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.records = JsonlLog(self.dir / RECORDS).read()
        self.dropped = JsonlLog(self.dir / DROPPED).read()
        self.done_ids = {r["id"] for r in self.records} | {r["id"] for r in self.dropped}
        self._backends: dict[str, Backend] = {}
        self.usage: dict[str, Any] = {}  # backend counters of this run of the stage
        self.failures: Counter[str] = Counter()  # failed requests by reason, this run

    @property
    def seed(self) -> int:
        return self.run.seed

    def seed_for(self, *parts: Any) -> int:
        """A per-record seed: same record, same seed, whatever the batch or resume."""
        return int(stable_hash([self.run.seed, self.name, *parts], 8), 16)

    def inputs(self, name: str | None = None) -> list[dict[str, Any]]:
        """The kept records of an upstream stage (the first input by default)."""
        name = name or self.stage.inputs[0]
        return JsonlLog(self.run_dir / name / RECORDS).read()

    def backend_config(self) -> BackendConfig:
        return self.config.backend or self.run.generation_backend()

    def backend(self, config: BackendConfig | None = None) -> Backend:
        """A backend built once per stage run (closed by the runner)."""
        config = config or self.backend_config()
        key = config.model_dump_json()
        if key not in self._backends:
            self._backends[key] = load_backend(config)
        return self._backends[key]

    def set_total(self, total: int) -> None:
        """How many items the stage will process in all (kept + dropped)."""
        self._progress.set_total(total)

    def advance(self, n: int) -> None:
        self._progress.advance(n)

    def log(self, message: str) -> None:
        print(f"[{self.name}] {message}", file=sys.stderr, flush=True)

    def aux_log(self, name: str) -> JsonlLog:
        """Another append-only JSONL file in the stage folder (e.g. TGRT topics)."""
        return JsonlLog(self.dir / f"{name}.jsonl")

    def close(self) -> None:
        """Close the stage's backends (a stage may call it early, e.g. before training)."""
        for backend in self._backends.values():
            _add_usage(self.usage, backend.stats.as_dict())
            backend.close()
        self._backends.clear()


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
    ) -> None:
        self.run, self.stage_configs = run, stage_configs
        self.run_dir, self.config_file = Path(run_dir), config_file
        self.stages = registered_stages()
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
            "inputs": {name: upstream[name] for name in stage.inputs},
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
            for dep in stage.inputs:
                if dep not in self.stage_configs:
                    raise InputError(
                        f"needs stage {dep!r}, which is not configured",
                        file=self.config_file, field=f"stages.{name}",
                    )  # fmt: skip
            config = self.stage_configs[name]
            fp = fps[name] = self.fingerprint(stage, config, fps)
            items.append(PlanItem(stage, config, fp, *self._action(name, fp)))
        if only is not None:
            upstream = [i for i in items if i.stage.name in self.stages[only].inputs]
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
        done = len(JsonlLog(self.run_dir / name / RECORDS).read())
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
            prior_seconds = 0.0
        else:
            prior_seconds = (self.manifest.entry(name) or {}).get("timings", {}).get("seconds", 0.0)
        if item.action in ("run", "rerun"):
            self.manifest.data["stages"].pop(name, None)
        self.manifest.update(
            name, status="running", fingerprint=item.fingerprint, error=None,
            timings={"started": _now(), "seconds": prior_seconds},
        )  # fmt: skip
        t0 = time.monotonic()
        reset_peak_memory()
        with ProgressReporter(name, total=0) as progress:
            ctx = StageContext(
                stage, item.config, self.run, self.run_dir, item.fingerprint, progress
            )
            progress.done = progress.start_done = len(ctx.done_ids)
            kept_log, drop_log = JsonlLog(ctx.dir / RECORDS), JsonlLog(ctx.dir / DROPPED)
            try:
                for batch in stage.run(ctx):
                    keep = [r for r in batch.keep if r["id"] not in ctx.done_ids]
                    ctx.done_ids.update(r["id"] for r in keep)
                    drop = [
                        {"id": r["id"], "reason": why, **{k: v for k, v in r.items() if k != "id"}}
                        for r, why in batch.drop
                        if r["id"] not in ctx.done_ids
                    ]
                    ctx.done_ids.update(r["id"] for r in drop)
                    kept_log.append(keep)
                    drop_log.append(drop)
                    ctx.records.extend(keep)
                    ctx.dropped.extend(drop)
                    ctx.failures.update(why for _, why in batch.failed)
                    progress.advance(len(keep) + len(drop) + len(batch.failed))
            except BaseException as e:
                ctx.close()
                error = f"{type(e).__name__}: {e}"
                self._finish(ctx, t0, prior_seconds, status="failed", error=error)
                raise
            ctx.close()
        if ctx.failures:
            n = sum(ctx.failures.values())
            error = f"{n} requests failed ({', '.join(ctx.failures)}); run again to retry them"
            self._finish(ctx, t0, prior_seconds, status="incomplete", error=error)
            raise StageIncomplete(f"stage {name!r}: {error}")
        self._finish(ctx, t0, prior_seconds, status="complete", error=None)

    def _finish(
        self, ctx: StageContext, t0: float, prior: float, *, status: str, error: str | None
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
        usage = _add_usage(dict(entry.get("usage", {})), ctx.usage)
        values: dict[str, Any] = dict(
            status=status,
            error=error,
            timings=timings,
            usage=usage,
            counts={
                "in": ctx._progress.total or len(ctx.records) + len(ctx.dropped),
                "out": len(ctx.records),
                "dropped": len(ctx.dropped),
                "failed": sum(ctx.failures.values()),
            },
            drop_reasons=dict(Counter(r["reason"] for r in ctx.dropped).most_common()),
            failure_reasons=dict(ctx.failures),
        )
        if status == "complete" and ctx.stage.summarize is not None:
            values["stats"] = ctx.stage.summarize(ctx.records, ctx.dropped, ctx)
        self.manifest.update(name, **values)
