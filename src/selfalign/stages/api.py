"""What a stage is and what it may use: the contract between the stages and the runner.

A stage is a generator function of a ``StageContext``. It yields units of work and the
runner (``selfalign.pipeline``) does the rest: it commits records, skips what a killed
run already wrote, shows progress, records rounds and renames built models into place.

- ``Batch``: records to keep and to drop, committed as one unit.
- ``MapWork``: items in, records out. The stage gives its items (record id -> item, in
  working order) and a function that turns a chunk of them into a ``Batch``; the runner
  skips done ids, cuts fixed chunk boundaries (a resumed run batches as before) and counts.
- ``Round``: one round of a loop whose rounds feed the next. The runner commits the
  round's batch, then marks the round finished in ``STAGE/rounds.jsonl``; a resumed stage
  asks ``ctx.finished_rounds(phase)`` where to start.
- ``Artifact``: a model the stage builds. The runner hands ``build`` a work folder that
  survives a kill (training resumes from its checkpoints there), renames it to the stage's
  ``artifact`` path once built and records it in the manifest; later stages ask
  ``ctx.artifact(stage)`` for it instead of guessing a path.

A stage may also say, before it runs, how much work it will be (``Stage.estimate``: an
``Estimate`` from its settings' sizes; ``run --dry-run`` prints it).
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from selfalign.backends import Backend, BackendConfig, load_backend
from selfalign.config import RunConfig, StageConfig
from selfalign.store import JsonlWriter, read_records, stable_hash

RECORDS, DROPPED, ROUNDS, MANIFEST = "records.jsonl", "dropped.jsonl", "rounds", "manifest.json"

T = TypeVar("T")


@dataclass
class Batch:
    """Records to keep, (record, reason) pairs dropped, and (record, reason) pairs whose
    request failed. Failed ones are not committed: the stage ends ``incomplete`` and the
    next run asks for them again."""

    keep: list[dict[str, Any]] = field(default_factory=list)
    drop: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    failed: list[tuple[dict[str, Any], str]] = field(default_factory=list)


@dataclass
class MapWork(Generic[T]):
    """Items in, records out; ``process`` gets a chunk of (record id, item) pairs."""

    items: dict[str, T]
    chunk_size: int
    process: Callable[[list[tuple[str, T]]], Batch]
    start: Callable[[], None] | None = None  # once, before the first chunk left to do


@dataclass
class Round:
    """A finished round of a loop stage. ``left``: at most how many rounds may follow (the
    runner's progress estimate); ``info`` goes into the round's marker."""

    phase: str
    number: int
    batch: Batch
    left: int = 0
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Artifact:
    """A model the stage builds into the folder it is given; ``examples``: how many
    training examples went in (the stage's ``in`` count). ``path``: a further model of the
    stage (an ablation row), relative to the run directory and inside the stage's folder;
    None: the stage's own ``Stage.artifact``."""

    build: Callable[[Path], None]
    examples: int = 0
    path: str | None = None


@dataclass(frozen=True)
class Estimate:
    """Rough upper bounds on a stage's work, from its settings' sizes: requests and tokens
    it may send to its backend, examples it may train on and the tokens that training
    runs through the model (``train_tokens``: every epoch, each sequence at its
    ``max_length``), and ``outputs``, the records it may pass downstream (what a later
    stage's estimate reads). ``note``: what the bounds rest on, when a reader should know
    (a loop's cap, say)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    train_examples: int | None = None
    outputs: int = 0
    note: str | None = None
    train_tokens: int = 0

    def __add__(self, other: Estimate) -> Estimate:
        trains = [n for n in (self.train_examples, other.train_examples) if n is not None]
        notes = [n for n in (self.note, other.note) if n]
        return Estimate(
            self.requests + other.requests,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            sum(trains) if trains else None,
            self.outputs + other.outputs,
            "; ".join(notes) or None,
            self.train_tokens + other.train_tokens,
        )


def train_token_bound(
    examples: int,
    *,
    epochs: float,
    max_steps: int | None,
    batch: int | None,
    max_length: int,
    sequences: int = 1,
) -> int:
    """Tokens a training run may push through the model: examples x epochs (or, with
    ``max_steps``, steps x global batch) x ``sequences`` per example x ``max_length``."""
    if max_steps is not None and max_steps > 0 and batch:
        runs = max_steps * batch
    else:
        runs = math.ceil(examples * epochs)
    return runs * sequences * max_length


@dataclass(frozen=True)
class EstimateContext:
    """What an estimate may use: the run's settings; the records each upstream stage
    passes on (its real count when complete, else its own estimate); a token counter
    (the run model's tokenizer, else about four characters a token); and the tokens of a
    typical user prompt (the shipped seed tasks' mean), for prompts not written yet."""

    run: RunConfig
    upstream: dict[str, int]
    count_tokens: Callable[[str], int]
    typical_prompt_tokens: int

    def inputs(self, name: str) -> int:
        return self.upstream.get(name, 0)


Work = Batch | MapWork | Round | Artifact
StageFn = Callable[["StageContext"], Iterator[Work]]


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
    # where the model an ``Artifact`` builds goes, relative to the run directory
    artifact: str | None = None
    # settings -> the upstream stages this configuration reads (default: ``inputs``)
    inputs_of: Callable[[Any], tuple[str, ...]] | None = None
    # (settings, EstimateContext) -> Estimate: how much work the stage will be (dry-run)
    estimate: Callable[[Any, EstimateContext], Estimate] | None = None
    version: int = 1

    def needs(self, config: StageConfig) -> tuple[str, ...]:
        return self.inputs_of(config) if self.inputs_of is not None else self.inputs


class StageContext:
    """Everything a stage may use. Reads are pure; the runner's own writers (records,
    rounds, aux files) are the only ones a stage writes through."""

    def __init__(
        self,
        stage: Stage,
        config: StageConfig,
        run: RunConfig,
        run_dir: Path,
        fingerprint: str,
        manifest: dict[str, Any],
    ) -> None:
        self.stage, self.config, self.run, self.run_dir = stage, config, run, run_dir
        self.name, self.fingerprint, self._manifest = stage.name, fingerprint, manifest
        self.dir = run_dir / stage.name
        self.records = read_records(self.dir / RECORDS)
        self.dropped = read_records(self.dir / DROPPED)
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
        return read_records(self.run_dir / (name or self.stage.inputs[0]) / RECORDS)

    def artifact(self, name: str | None = None, path: str | None = None) -> Path:
        """The model an upstream stage built (this stage's own by default); ``path``: one
        of its further models (``Artifact.path``)."""
        from selfalign.registry import load_stage

        name = name or self.name
        entry = self._manifest.get("stages", {}).get(name) or {}
        recorded = entry.get("artifact") if path is None else path
        if path is not None and path not in entry.get("artifacts", []):
            raise RuntimeError(f"stage {name!r} has not built {path} yet")
        if recorded is None:  # a run directory from before artifacts were recorded
            recorded = (self.stage if name == self.name else load_stage(name)).artifact
        path = self.run_dir / (recorded or name)
        if not path.is_dir():
            raise RuntimeError(f"stage {name!r} has not built its model yet ({path} is missing)")
        return path

    def backend_config(self) -> BackendConfig:
        return self.config.backend or self.run.generation_backend()

    def backend(self, config: BackendConfig | None = None, *, alone: bool = False) -> Backend:
        """A backend built once per stage run (closed by the runner). ``alone``: close the
        stage's other backends first (one model in memory at a time)."""
        config = config or self.backend_config()
        key = config.model_dump_json()
        if alone and set(self._backends) - {key}:
            self.close(keep=key)
        if key not in self._backends:
            self._backends[key] = load_backend(config)
        return self._backends[key]

    def log(self, message: str) -> None:
        print(f"[{self.name}] {message}", file=sys.stderr, flush=True)

    def read_aux(self, name: str) -> list[dict[str, Any]]:
        """Another JSONL file in the stage folder (e.g. TGRT topics)."""
        return read_records(self.dir / f"{name}.jsonl")

    def append_aux(self, name: str, records: list[dict[str, Any]]) -> None:
        JsonlWriter(self.dir / f"{name}.jsonl").append(records)

    def finished_rounds(self, phase: str) -> list[dict[str, Any]]:
        """The markers of the finished rounds of ``phase``, in order."""
        return sorted(
            (r for r in self.read_aux(ROUNDS) if r["phase"] == phase), key=lambda r: r["round"]
        )

    def close(self, keep: str | None = None) -> None:
        """Close the stage's backends (but ``keep``), adding up their usage counters."""
        for key in [k for k in self._backends if k != keep]:
            backend = self._backends.pop(key)
            add_usage(self.usage, backend.stats.as_dict())
            backend.close()


def add_usage(total: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """Add backend counters (numbers, and dicts of counts per reason) into ``total``."""
    for key, value in more.items():
        if isinstance(value, dict):
            merged = Counter(total.get(key, {}))
            merged.update(value)
            total[key] = dict(merged)
        else:
            total[key] = total.get(key, 0) + value
    return total
