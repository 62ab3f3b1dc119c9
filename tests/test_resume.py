"""Kill a real stage with SIGKILL at several points; the resumed run equals a straight one.

Also: fingerprints re-run a changed stage and its downstream, nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

# Stage 1's sequential Self-Instruct loop (the pool grows round by round) plus TGRT: the
# hardest stage to resume exactly, since later rounds depend on what earlier ones kept.
STAGE_1 = {
    "self_instruct": {"num_prompts": 500, "requests_per_round": 3, "max_rounds": 6,
                      "max_new_tokens": 40},
    "tgrt": {"topics_per_type": 1, "topic_rounds": 1, "topic_requests_per_type": 1,
             "topic_max_new_tokens": 16, "question_max_new_tokens": 16, "requests_per_batch": 8},
}  # fmt: skip


def write_config(path: Path, model: Path, stages: dict) -> Path:
    config = {"model": str(model), "seed": 11, "backend": {"model": str(model), "batch_size": 4},
              "stages": stages}  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "selfalign.cli", *args]


def committed_lines(stage_dir: Path) -> int:
    return sum(
        p.read_bytes().count(b"\n")
        for p in (stage_dir / "records.jsonl", stage_dir / "dropped.jsonl")
        if p.exists()
    )


def read_stage(stage_dir: Path) -> tuple[list[dict], list[dict]]:
    def read(name: str) -> list[dict]:
        path = stage_dir / name
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    return read("records.jsonl"), read("dropped.jsonl")


def kill_when(config: Path, run_dir: Path, stage: str, lines: int, timeout: float = 240) -> None:
    """Start a run and SIGKILL it once ``lines`` records are committed (0: at once)."""
    proc = subprocess.Popen(
        cli("run", str(config), "--out", str(run_dir)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if lines == 0 and (run_dir / "manifest.json").exists():
                break
            if lines and committed_lines(run_dir / stage) >= lines:
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_equals_straight_run(
    tiny_model: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "config.yaml", tiny_model, {"prompts": STAGE_1})
    straight = tmp_path / "straight"
    subprocess.run(cli("run", str(config), "--out", str(straight)), check=True, capture_output=True)
    want_kept, want_dropped = read_stage(straight / "prompts")
    total = len(want_kept) + len(want_dropped)
    assert total >= 6, "the stage should commit several batches"

    killed = tmp_path / "killed"
    # kill points inside the self-instruct rounds: the stage's last batch (TGRT) may hold
    # every remaining line, after which the run completes before a kill can land
    si_lines = sum(r["source"] == "self_instruct" for r in want_kept + want_dropped)
    points = [0, 1, si_lines // 3, (2 * si_lines) // 3]
    for lines in points:
        kill_when(config, killed, "prompts", lines)
        manifest = json.loads((killed / "manifest.json").read_text())
        assert manifest["stages"]["prompts"]["status"] != "complete"
        assert committed_lines(killed / "prompts") < total
    done = subprocess.run(
        cli("run", str(config), "--out", str(killed)), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr

    got_kept, got_dropped = read_stage(killed / "prompts")
    assert got_kept == want_kept
    assert got_dropped == want_dropped
    ids = [r["id"] for r in got_kept + got_dropped]
    assert len(ids) == len(set(ids)), "no record is duplicated"
    a = json.loads((straight / "manifest.json").read_text())["stages"]["prompts"]
    b = json.loads((killed / "manifest.json").read_text())["stages"]["prompts"]
    assert (a["counts"], a["drop_reasons"], a["fingerprint"]) == (
        b["counts"], b["drop_reasons"], b["fingerprint"],
    )  # fmt: skip

    status = subprocess.run(cli("status", str(killed)), capture_output=True, text=True, check=True)
    assert "left: nothing, all stages complete" in status.stdout


def plan(config: Path, run_dir: Path) -> dict[str, str]:
    out = subprocess.run(
        cli("run", str(config), "--out", str(run_dir), "--dry-run"),
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = [line.split() for line in out.splitlines()[1:]]  # plan lines, not the estimates
    return {r[0]: r[1] for r in rows if len(r) > 1 and r[1] in ("reuse", "resume", "run", "rerun")}


def test_a_change_reruns_that_stage_and_downstream_only(tiny_model: Path, tmp_path: Path) -> None:
    small = {"self_instruct": {"num_prompts": 3, "requests_per_round": 2, "max_rounds": 1,
                               "max_new_tokens": 16},
             "tgrt": {"enabled": False}}  # fmt: skip
    stages = {"prompts": small, "aligned": {"max_new_tokens": 4, "max_prompts": 2}}
    config = write_config(tmp_path / "config.yaml", tiny_model, stages)
    run_dir = tmp_path / "run"
    assert plan(config, run_dir) == {"prompts": "run", "aligned": "run"}
    subprocess.run(cli("run", str(config), "--out", str(run_dir)), check=True, capture_output=True)
    assert plan(config, run_dir) == {"prompts": "reuse", "aligned": "reuse"}

    # Speed-only backend settings do not invalidate anything.
    stages_fast = yaml.safe_load(config.read_text())
    stages_fast["backend"]["batch_size"] = 2
    config.write_text(yaml.safe_dump(stages_fast))
    assert plan(config, run_dir) == {"prompts": "reuse", "aligned": "reuse"}

    stages["aligned"]["temperature"] = 0.4
    write_config(config, tiny_model, stages)
    assert plan(config, run_dir) == {"prompts": "reuse", "aligned": "rerun"}

    stages["prompts"]["self_instruct"]["max_new_tokens"] = 17
    write_config(config, tiny_model, stages)
    assert plan(config, run_dir) == {"prompts": "rerun", "aligned": "rerun"}

    # --only needs its inputs complete under the current settings.
    only = subprocess.run(
        cli("run", str(config), "--out", str(run_dir), "--only", "aligned"),
        capture_output=True, text=True,
    )  # fmt: skip
    assert only.returncode == 2
    assert "needs 'prompts' complete first" in only.stderr


def test_a_data_folder_hash_follows_its_files(tmp_path: Path) -> None:
    from selfalign.store import file_sha256

    folder = tmp_path / "hhh"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.json").write_text("[1]")
    (folder / "sub" / "b.json").write_text("[2]")
    seen = {file_sha256(folder)}
    (folder / "sub" / "b.json").write_text("[3]")
    seen.add(file_sha256(folder))
    (folder / "sub" / "b.json").rename(folder / "sub" / "c.json")
    seen.add(file_sha256(folder))
    assert len(seen) == 3
    assert file_sha256(folder) == file_sha256(folder)
