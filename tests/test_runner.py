"""The runner's three kinds of work (map, round, artifact) on small stages of our own, and
the commands that only look: they never write, never lose what a live writer commits, and
never import torch."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from selfalign.config import RunConfig
from selfalign.pipeline import BUILD_DIR, Runner, StageIncomplete
from selfalign.stages.api import Artifact, Batch, MapWork, Round, Stage, StageContext
from selfalign.store import read_records
from selfalign.validation import StrictModel

SRC = Path(__file__).resolve().parents[1] / "src" / "selfalign"


class Killed(Exception):
    """Stands in for a kill: the stage stops where it is."""


class NoSettings(StrictModel):
    backend: None = None


def run_stage(stage: Stage, run_dir: Path, model: Path) -> None:
    run = RunConfig(model=str(model))
    runner = Runner(run, {stage.name: NoSettings()}, run_dir, run_dir, stages={stage.name: stage})
    runner.execute(runner.plan())


# -- map ------------------------------------------------------------------------------------
def map_stage(sent: list[list[str]], fail: set[str], crash_at: int | None = None) -> Stage:
    """Ten items in chunks of three; ``fail``: items whose request fails; ``crash_at``: the
    chunk (counted from 0 in this process) at which the stage dies before committing."""

    def process(chunk: list[tuple[str, int]]) -> Batch:
        if crash_at is not None and len(sent) == crash_at:
            raise Killed  # nothing of this chunk is committed
        sent.append([i for i, _ in chunk])
        batch = Batch()
        for i, n in chunk:
            if i in fail:
                batch.failed.append(({"id": i}, "timeout"))
            elif n % 4 == 0:
                batch.drop.append(({"id": i, "n": n}, "multiple_of_four"))
            else:
                batch.keep.append({"id": i, "n": n})
        return batch

    def run(ctx: StageContext):
        yield MapWork({f"i{n:02d}": n for n in range(10)}, 3, process)

    return Stage("numbers", NoSettings, run)  # type: ignore[arg-type]


def test_map_keeps_fixed_chunk_boundaries_across_failures_and_kills(tiny_model, tmp_path):
    straight: list[list[str]] = []
    run_stage(map_stage(straight, set()), tmp_path / "straight", tiny_model)
    assert straight == [["i00", "i01", "i02"], ["i03", "i04", "i05"], ["i06", "i07", "i08"],
                        ["i09"]]  # fmt: skip

    run_dir, sent = tmp_path / "resumed", []
    with pytest.raises(Killed):  # i04 fails (the rest of its chunk is committed), then a kill
        run_stage(map_stage(sent, {"i04"}, crash_at=2), run_dir, tiny_model)
    assert sent == straight[:2]
    run_stage(map_stage(sent := [], set()), run_dir, tiny_model)
    # the failed item is asked alone, not merged into the next chunk; later chunks as before
    assert sent == [["i04"], *straight[2:]]
    want = read_records(tmp_path / "straight" / "numbers" / "records.jsonl")
    assert sorted(read_records(run_dir / "numbers" / "records.jsonl"), key=str) == sorted(
        want, key=str
    )
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]["numbers"]
    assert manifest["status"] == "complete"
    assert manifest["counts"] == {"in": 10, "out": 7, "dropped": 3, "failed": 0}


# -- rounds ---------------------------------------------------------------------------------
def test_rounds_are_marked_after_their_batch_and_a_failed_round_is_not(tiny_model, tmp_path):
    fail_round = [1]

    def run(ctx: StageContext):
        start = len(ctx.finished_rounds("grow"))
        for k in range(start, 3):
            batch = Batch(keep=[{"id": f"r{k}", "round": k}])
            if k == fail_round[0]:
                batch = Batch(failed=[({"id": f"r{k}"}, "timeout")])
            yield Round("grow", k, batch, left=2 - k, info={"requests": 1})
            if batch.failed:
                return

    stage = Stage("loop", NoSettings, run)  # type: ignore[arg-type]
    with pytest.raises(StageIncomplete):
        run_stage(stage, tmp_path, tiny_model)
    markers = read_records(tmp_path / "loop" / "rounds.jsonl")
    assert [(m["phase"], m["round"], m["requests"], m["kept"]) for m in markers] == [
        ("grow", 0, 1, 1)
    ]
    fail_round[0] = -1
    run_stage(stage, tmp_path, tiny_model)
    assert [m["round"] for m in read_records(tmp_path / "loop" / "rounds.jsonl")] == [0, 1, 2]
    assert [r["id"] for r in read_records(tmp_path / "loop" / "records.jsonl")] == [
        "r0", "r1", "r2",
    ]  # fmt: skip


# -- artifacts ------------------------------------------------------------------------------
def test_an_artifact_is_built_in_a_work_folder_then_renamed_and_recorded(tiny_model, tmp_path):
    builds: list[list[str]] = []

    def build(folder: Path) -> None:
        builds.append(sorted(p.name for p in folder.iterdir()))  # what a killed build left
        (folder / "checkpoint-1").mkdir(exist_ok=True)
        if len(builds) == 1:
            raise Killed  # mid-training
        (folder / "model.safetensors").write_text("weights")

    def run(ctx: StageContext):
        yield Artifact(build, examples=5)

    def run_user(ctx: StageContext):
        yield Batch(keep=[{"id": "x", "model": str(ctx.artifact("model"))}])

    model_stage = Stage("model", NoSettings, run, artifact="model/final")  # type: ignore[arg-type]
    user = Stage("user", NoSettings, run_user, inputs=("model",))  # type: ignore[arg-type]
    stages = {"model": model_stage, "user": user}
    runner = Runner(
        RunConfig(model=str(tiny_model)), dict.fromkeys(stages, NoSettings()), tmp_path,
        tmp_path, stages=stages,
    )  # fmt: skip
    with pytest.raises(Killed):
        runner.execute(runner.plan())
    assert not (tmp_path / "model" / "final").exists()
    assert (tmp_path / BUILD_DIR / "model" / "final" / "checkpoint-1").is_dir()

    runner = Runner(runner.run, runner.stage_configs, tmp_path, tmp_path, stages=stages)
    runner.execute(runner.plan())
    assert builds == [[], ["checkpoint-1"]]  # the second build resumed from the first's files
    final = tmp_path / "model" / "final"
    assert (final / "model.safetensors").read_text() == "weights"
    assert not (tmp_path / BUILD_DIR / "model" / "final").exists()
    manifest = json.loads((tmp_path / "manifest.json").read_text())["stages"]
    assert manifest["model"]["artifact"] == "model/final"
    assert manifest["model"]["counts"]["in"] == 5
    assert read_records(tmp_path / "user" / "records.jsonl")[0]["model"] == str(final)

    runner = Runner(runner.run, runner.stage_configs, tmp_path, tmp_path, stages=stages)
    assert [i.action for i in runner.plan()] == ["reuse", "reuse"]


# -- commands that only look ----------------------------------------------------------------
WRITER = """
import json, os, sys, time
path, n = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
for i in range(n):  # each line in two writes: readers see torn tails all the time
    line = json.dumps({"id": f"r{i:04d}", "answer": "x" * 200}) + "\\n"
    os.write(fd, line[:100].encode())
    time.sleep(0.002)
    os.write(fd, line[100:].encode())
    os.fsync(fd)
"""


def live_run(tmp_path: Path, model: Path) -> tuple[Path, Path]:
    """A run directory whose ``aligned`` stage is running, and its config."""
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump({"model": str(model), "stages": {"prompts": None, "aligned": None}})
    )
    run_dir = tmp_path / "run"
    (run_dir / "aligned").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config.read_text())
    manifest = {"stages": {"aligned": {"status": "running", "fingerprint": "x"}}}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    return run_dir, config


def test_status_report_and_dry_run_lose_nothing_a_live_writer_commits(tiny_model, tmp_path):
    from selfalign.cli import main

    run_dir, config = live_run(tmp_path, tiny_model)
    records = run_dir / "aligned" / "records.jsonl"
    n = 300
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(records), str(n)])
    looks = 0
    while writer.poll() is None or looks < 3:
        for args in (["status", str(run_dir)], ["report", str(run_dir)],
                     ["run", str(config), "--out", str(run_dir), "--dry-run"]):  # fmt: skip
            assert main(args) == 0
        looks += 1
    assert writer.wait() == 0
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"r{i:04d}" for i in range(n)]


def tree(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))}  # fmt: skip


def test_looking_writes_nothing_and_imports_no_torch(tiny_model, tmp_path):
    run_dir, config = live_run(tmp_path, tiny_model)
    (run_dir / "aligned" / "records.jsonl").write_text('{"id": "a"}\n{"id": "b", "torn')
    before = tree(tmp_path)
    probe = textwrap.dedent(f"""
        import sys
        from selfalign.cli import main
        for args in (["status", {str(run_dir)!r}],
                     ["run", {str(config)!r}, "--out", {str(run_dir)!r}, "--dry-run"],
                     ["run", {str(config)!r}, "--dry-run"]):
            assert main(args) == 0, args
        heavy = [m for m in ("torch", "transformers", "peft", "trl", "datasets") if m in sys.modules]
        assert not heavy, heavy
    """)
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    # the committed line counts, the torn one does not (and is left where it is)
    assert re.search(r"^aligned\s+running\s+-\s+1\s", done.stdout, re.M), done.stdout
    assert tree(tmp_path) == before  # no folder (not even runs/), no cut tail


# -- layers ---------------------------------------------------------------------------------
def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The selfalign modules ``path`` imports, at any depth, except for type checking."""
    tree_ = ast.parse(path.read_text())
    skip = {
        id(node)
        for stmt in ast.walk(tree_)
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test)
        for node in ast.walk(stmt)
    }
    found = set()
    for node in ast.walk(tree_):
        if id(node) in skip:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in known}
    return found


def test_no_import_cycles_among_selfalign_modules():
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    graph = {m: imports_of(p, set(files)) - {m} for m, p in files.items()}
    cycles = []

    def visit(node: str, path: list[str], state: dict[str, int]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt], state)
        state[node] = 2

    state: dict[str, int] = {}
    for module in sorted(graph):
        if module not in state:
            visit(module, [module], state)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_backends_and_settings_load_without_torch():
    probe = (
        "import sys\n"
        "import selfalign.backends.openai_backend, selfalign.mote.config, selfalign.train.config\n"
        "import selfalign.stages.mote_stage, selfalign.stages.verbose, selfalign.stages.evaluate\n"
        "assert 'torch' not in sys.modules, 'torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
    assert done.returncode == 0, done.stderr


# -- the real map stages: a kill, then a resume, sends the backend the same batches ---------
def prompt_rows(n: int) -> list[dict]:
    from selfalign.annotations.loaders import load_seed_tasks

    return [{"id": s.id, "instruction": s.instruction, "input": s.input,
             "source": "self_instruct"} for s in load_seed_tasks()[:n]]  # fmt: skip


def verbose_work(ctx: StageContext):
    from selfalign.stages.verbose import run_verbose

    yield next(run_verbose(ctx))  # the teacher's answers; not the student's training


def tgrt_work(ctx: StageContext):
    from selfalign.annotations.loaders import load_redteam_types
    from selfalign.stages.tgrt import question_work

    seeds = load_redteam_types()
    topics = {s.type: [{"id": f"{s.id}-{k}", "type": s.type, "topic": f"topic {k}", "round": 0}
                       for k in range(3)] for s in seeds[:3]}  # fmt: skip
    yield question_work(ctx, ctx.config.tgrt, seeds, topics)


def aligned_work(ctx: StageContext):
    from selfalign.stages.aligned import run_aligned

    yield from run_aligned(ctx)


def stage_case(name: str, model: Path, shared: Path):
    """(stage, settings) running one real map stage's work on the tiny model."""
    from selfalign.backends import BackendConfig
    from selfalign.stages.aligned import AlignedConfig
    from selfalign.stages.chains import ChainsConfig, run_chains
    from selfalign.stages.prompts import PromptsConfig
    from selfalign.stages.verbose import VerboseConfig

    backend = BackendConfig(model=str(model), batch_size=3)
    if name == "verbose":
        cfg = VerboseConfig(backend=backend, batch_size=3, max_new_tokens=6)
        return Stage("verbose", VerboseConfig, verbose_work), cfg
    if name == "tgrt":
        cfg = PromptsConfig(tgrt={"question_max_new_tokens": 6, "requests_per_batch": 4})
        return Stage("prompts", PromptsConfig, tgrt_work), cfg
    if name == "aligned":
        return Stage("aligned", AlignedConfig, aligned_work), AlignedConfig(
            backend=backend, chunk_size=3, max_new_tokens=6, max_prompts=8
        )
    queries = shared / "advbench" / "advbench_behaviors.csv"
    cfg = ChainsConfig(queries=[queries], limit=7, chunk_size=3, max_new_tokens=4,
                       check_max_new_tokens=4, backend=backend)  # fmt: skip
    return Stage("chains", ChainsConfig, run_chains), cfg


@pytest.mark.parametrize("name", ["verbose", "tgrt", "aligned", "chains"])
def test_a_killed_map_stage_resumes_with_the_batches_of_a_straight_run(
    name, tiny_model, shared_data, tmp_path, monkeypatch
):
    from selfalign.backends.hf import HFBackend

    stage, cfg = stage_case(name, tiny_model, shared_data)
    sent: list[list[int]] = []
    kill_at = [None]
    generate = HFBackend.generate

    def logged(self, requests):
        if len(sent) == kill_at[0]:
            raise Killed
        sent.append([r.seed for r in requests])
        return generate(self, requests)

    monkeypatch.setattr(HFBackend, "generate", logged)

    def run(run_dir: Path) -> list[dict]:
        (run_dir / "prompts").mkdir(parents=True, exist_ok=True)
        if stage.name != "prompts":
            rows = "".join(json.dumps(r) + "\n" for r in prompt_rows(10))
            (run_dir / "prompts" / "records.jsonl").write_text(rows)
        runner = Runner(RunConfig(model=str(tiny_model), seed=3), {stage.name: cfg}, run_dir,
                        run_dir, stages={stage.name: stage})  # fmt: skip
        runner.execute(runner.plan())
        return read_records(run_dir / stage.name / "records.jsonl") + read_records(
            run_dir / stage.name / "dropped.jsonl"
        )

    want = run(tmp_path / "straight")
    straight, sent[:] = list(sent), []
    assert len(straight) >= 3, straight
    kill_at[0] = len(straight) // 2  # (chains: one chunk calls the backend several times)
    with pytest.raises(Killed):
        run(tmp_path / "killed")
    kill_at[0] = None
    sent.clear()
    got = run(tmp_path / "killed")
    # the resumed run redoes the chunk in flight and goes on exactly as the straight one
    assert 0 < len(sent) < len(straight)
    assert sent == straight[-len(sent) :]
    assert sorted(got, key=lambda r: r["id"]) == sorted(want, key=lambda r: r["id"])
