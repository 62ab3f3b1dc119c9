"""The reproducibility record: what a run ran on, kept in its manifest per stage, with only
the environment variables that change numerics (never a secret)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from selfalign.backends import BackendConfig
from selfalign.config import RunConfig
from selfalign.environment import NUMERICS_ENV, compare, environment_hash, environment_record
from selfalign.pipeline import Runner
from selfalign.stages.api import Batch, Stage, StageContext
from selfalign.status import describe_run
from selfalign.validation import StrictModel

SECRET = "sk-test-123"


def test_the_record_names_versions_devices_and_numerics_switches(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_456")
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    record = environment_record()
    assert record["python"] == platform.python_version()
    assert {"torch", "transformers", "peft", "trl", "accelerate"} <= set(record["packages"])
    assert record["env"]["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert set(record["env"]) <= set(NUMERICS_ENV)
    assert record["devices"]["cpu_count"] >= 1 and "available" in record["devices"]["cuda"]
    assert set(record["torch"]) == {
        "matmul_allow_tf32", "cudnn_allow_tf32", "deterministic_algorithms", "num_threads",
    }  # fmt: skip
    text = json.dumps(record)
    assert SECRET not in text and "hf_secret_456" not in text
    assert environment_hash(record) == environment_hash(environment_record())


def test_a_tiny_run_records_its_environment_per_stage_and_no_secret(
    tiny_model: Path, tmp_path: Path, run_aligned, monkeypatch
):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    run_dir = tmp_path / "run"
    block = BackendConfig(model=str(tiny_model))
    run_aligned(block, tiny_model, run_dir, ["Name a colour.", "Count to three."],
                max_new_tokens=4)  # fmt: skip
    manifest = json.loads((run_dir / "manifest.json").read_text())
    env = manifest["environment"]
    assert env["python"] == platform.python_version()
    assert env["packages"]["torch"] and env["packages"]["transformers"]
    entry = manifest["stages"]["aligned"]
    assert entry["status"] == "complete"
    assert manifest["environments"][entry["environment"]] == env
    assert entry["environment"] == environment_hash(env)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert files and not [p for p in files if SECRET.encode() in p.read_bytes()]


class NoSettings(StrictModel):
    backend: None = None


def one_record_stage(name: str) -> Stage:
    def run(ctx: StageContext):
        yield Batch(keep=[{"id": f"{name}-1", "text": "x"}])

    return Stage(name, NoSettings, run)  # type: ignore[arg-type]


def test_stages_run_under_different_environments_are_told_apart(
    tiny_model: Path, tmp_path: Path, monkeypatch
):
    run_dir, run = tmp_path / "run", RunConfig(model=str(tiny_model))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    for name in ("first", "second"):
        if name == "second":
            monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        runner = Runner(run, {name: NoSettings()}, run_dir, run_dir,
                        stages={name: one_record_stage(name)})  # fmt: skip
        runner.execute(runner.plan())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    first, second = (manifest["stages"][n]["environment"] for n in ("first", "second"))
    assert first != second and list(manifest["environments"]) == [first, second]
    assert manifest["environment"] == manifest["environments"][second]
    differ = compare(manifest["environments"][first], manifest["environments"][second])
    assert differ == ["env.CUBLAS_WORKSPACE_CONFIG"]
    assert "differ in env.CUBLAS_WORKSPACE_CONFIG" in describe_run(run_dir)
