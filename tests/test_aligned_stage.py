"""Stage 2 end to end on the tiny model, through the real runner and CLI: records and drops
by reason, the principle-usage histogram and refusal counts, the prefix prefilled once,
resume after SIGKILL, a prompt cap that samples both prompt sources.

The tiny model is random-init, so it writes no usable prompts in stage 1 (and gibberish in
stage 2): the run dir comes from the real ``prompts`` stage with its generators off, plus
stage-1 records written here from the shipped seed tasks. The keep path is pinned by
test_aligned_parse.py on hand-written generations.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from selfalign.annotations import DEFAULT_EXEMPLARS, DEFAULT_PRINCIPLES
from selfalign.annotations.loaders import load_redteam_types, load_seed_tasks
from selfalign.backends.hf import HFBackend
from selfalign.cli import main
from selfalign.config import load_run_config
from selfalign.pipeline import Runner
from selfalign.stages.aligned import REASONS, AlignedConfig, build
from selfalign.stages.prompts import prompt_text
from selfalign.store import JsonlWriter, record_id

N_PROMPTS, CHUNK = 6, 2
CONFIG = """\
model: {model}
seed: 7
stages:
  prompts:
    self_instruct: {{enabled: false}}
    tgrt: {{enabled: false}}
  aligned: {{max_new_tokens: 16, chunk_size: {chunk}{extra}}}
"""
# Runs the CLI and SIGKILLs itself right after the N-th batch it commits to aligned/.
KILLER = """
import os, signal, sys
from selfalign import store
append, done = store.JsonlWriter.append, [0]
def killing_append(self, records):
    records = list(records)
    append(self, records)
    if records and self.path.parent.name == "aligned":
        done[0] += 1
        if done[0] == int(os.environ["KILL_AFTER"]):
            os.kill(os.getpid(), signal.SIGKILL)
store.JsonlWriter.append = killing_append
from selfalign.cli import main
sys.exit(main(sys.argv[1:]))
"""


def read(run_dir: Path, name: str) -> list[dict]:
    return JsonlWriter(run_dir / "aligned" / name).read()


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["stages"]


def self_instruct_rows(n: int) -> list[dict]:
    """Stage-1 records of the first ``n`` shipped seed tasks, as Self-Instruct writes them."""
    return [
        {"id": record_id("self_instruct", t.id), "instruction": t.instruction, "input": t.input,
         "source": "self_instruct", "parents": [t.id], "round": 0}
        for t in load_seed_tasks()[:n]
    ]  # fmt: skip


def tgrt_rows(n: int) -> list[dict]:
    """Stage-1 records of the first ``n`` shipped red-team seeds, as TGRT writes them."""
    return [
        {"id": record_id("tgrt", t.type, t.topic), "instruction": t.instruction, "input": "",
         "source": "tgrt", "parents": [t.id], "type": t.type, "topic": t.topic}
        for t in load_redteam_types()[:n]
    ]  # fmt: skip


def make_run(
    tmp: Path, model: Path, extra: str = "", rows: list[dict] | None = None
) -> tuple[Path, Path, list[dict]]:
    """A run dir whose stage 1 is complete, holding ``rows`` as its stage-1 records
    (default: the first seed tasks)."""
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "run.yaml"
    cfg.write_text(CONFIG.format(model=model, chunk=CHUNK, extra=extra))
    run_dir = tmp / "run"
    assert main(["run", str(cfg), "--out", str(run_dir), "--until", "prompts"]) == 0
    if rows is None:
        rows = self_instruct_rows(N_PROMPTS)
        assert any(r["input"] for r in rows), "want a prompt with an input too"
    JsonlWriter(run_dir / "prompts" / "records.jsonl").append(rows)
    return cfg, run_dir, rows


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    cfg, run_dir, rows = make_run(tmp_path_factory.mktemp("ref"), tiny_model)
    assert main(["run", str(cfg), "--out", str(run_dir), "--only", "aligned"]) == 0
    return cfg, run_dir, rows


def test_stage2_writes_records_drops_and_usage(reference) -> None:
    _, run_dir, rows = reference
    entry = manifest(run_dir)["aligned"]
    kept, dropped = read(run_dir, "records.jsonl"), read(run_dir, "dropped.jsonl")
    assert entry["status"] == "complete"
    assert entry["counts"] == {
        "in": N_PROMPTS,
        "out": len(kept),
        "dropped": len(dropped),
        "failed": 0,
    }
    assert len(kept) + len(dropped) == N_PROMPTS
    assert sum(entry["drop_reasons"].values()) == len(dropped) > 0
    assert set(entry["drop_reasons"]) <= set(REASONS)
    by_prompt = {r["id"]: prompt_text(r) for r in rows}
    for d in dropped:  # every drop keeps what is needed to see why
        assert d["reason"] in REASONS and d["prompt"] == by_prompt[d["prompt_id"]]
        assert isinstance(d["output"], str) and d["finish_reason"] in ("stop", "length")
    usage = entry["stats"]["principle_usage"]
    assert list(usage) == [str(i) for i in range(1, 17)]
    assert sum(usage.values()) == sum(len(r["principles"]) for r in kept)
    refusals = entry["stats"]["refusals"]
    assert refusals["by_source"] == {
        "self_instruct": {"prompts": N_PROMPTS, "refused": entry["drop_reasons"].get("refusal", 0)}
    }
    assert refusals["by_type"] == {}  # no red-team prompts here
    assert sum(entry["stats"]["leak_sources"].values()) == entry["drop_reasons"].get(
        "leaked_exemplar", 0
    )
    print("\naligned:", entry["counts"], entry["drop_reasons"])


def test_prefix_is_prefilled_once_per_run(reference, tiny_model: Path) -> None:
    _, run_dir, rows = reference
    prompt, _ = build(AlignedConfig())
    tok = HFBackend(tiny_model)
    shared = len(tok.head_ids + tok.encode(prompt.prefix()))
    own = [len(tok.encode(prompt.query_prompt(prompt_text(r)))) for r in rows]
    # The backend caches all shared tokens but the last, which each row feeds itself.
    expected = (shared - 1) + sum(n + 1 for n in own)
    usage = manifest(run_dir)["aligned"]["usage"]
    assert usage["requests"] == N_PROMPTS > CHUNK  # several generate calls, one prefix
    assert usage["prefill_tokens"] == expected
    assert usage["prompt_tokens"] == N_PROMPTS * shared + sum(own)


def test_resume_after_sigkill_equals_a_straight_run(reference, tmp_path: Path, tiny_model) -> None:
    cfg, run_dir, _ = make_run(tmp_path, tiny_model)
    env = {**os.environ, "KILL_AFTER": "1"}
    args = ["run", str(cfg), "--out", str(run_dir), "--only", "aligned"]
    proc = subprocess.run([sys.executable, "-c", KILLER, *args], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert manifest(run_dir)["aligned"]["status"] == "running"
    assert len(read(run_dir, "records.jsonl") + read(run_dir, "dropped.jsonl")) == CHUNK

    assert main(args) == 0  # the same command resumes
    ref_dir = reference[1]
    for name in ("records.jsonl", "dropped.jsonl"):
        assert read(run_dir, name) == read(ref_dir, name)
    entry, ref_entry = manifest(run_dir)["aligned"], manifest(ref_dir)["aligned"]
    assert entry["status"] == "complete" and entry["fingerprint"] == ref_entry["fingerprint"]
    assert entry["counts"] == ref_entry["counts"]
    assert entry["drop_reasons"] == ref_entry["drop_reasons"]


def test_a_prompt_cap_samples_red_team_prompts_too(tmp_path: Path, tiny_model: Path) -> None:
    """Stage 1 writes every self-instruct prompt before the TGRT ones; a cap over the file
    order would answer no red-team prompt at all."""
    rows = self_instruct_rows(10) + tgrt_rows(10)
    cfg, run_dir, _ = make_run(tmp_path, tiny_model, ", max_prompts: 6", rows)
    assert main(["run", str(cfg), "--out", str(run_dir), "--only", "aligned"]) == 0
    answered = read(run_dir, "records.jsonl") + read(run_dir, "dropped.jsonl")
    assert len(answered) == 6
    by_id = {r["id"]: r for r in rows}
    sources = Counter(by_id[r["prompt_id"]]["source"] for r in answered)
    assert sources["tgrt"] > 0 and sources["self_instruct"] > 0
    for r in answered:  # kept and dropped records say where their prompt came from
        prompt = by_id[r["prompt_id"]]
        assert (r["source"], r["type"]) == (prompt["source"], prompt.get("type"))
    refusals = manifest(run_dir)["aligned"]["stats"]["refusals"]
    assert {k: v["prompts"] for k, v in refusals["by_source"].items()} == dict(sources)
    assert sum(v["prompts"] for v in refusals["by_type"].values()) == sources["tgrt"]


def test_editing_an_annotation_file_reruns_stage_2(tmp_path: Path, tiny_model: Path) -> None:
    principles, exemplars = tmp_path / "p.yaml", tmp_path / "e.yaml"
    principles.write_text(DEFAULT_PRINCIPLES.read_text())
    exemplars.write_text(DEFAULT_EXEMPLARS.read_text())
    extra = f", principles: {principles}, exemplars: {exemplars}"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG.format(model=tiny_model, chunk=CHUNK, extra=extra))

    def fingerprints() -> dict[str, str]:
        run, stages = load_run_config(cfg)
        return {i.stage.name: i.fingerprint for i in Runner(run, stages, tmp_path, cfg).plan()}

    before = fingerprints()
    exemplars.write_text(exemplars.read_text().replace("Lisbon", "Porto"))
    after = fingerprints()
    assert after["prompts"] == before["prompts"] and after["aligned"] != before["aligned"]


def test_bad_exemplars_file_exits_2_naming_file_and_entry(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exemplars = tmp_path / "mine.yaml"
    exemplars.write_text(DEFAULT_EXEMPLARS.read_text().replace("[10, 7, 1]", "[10, 70, 1]"))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG.format(model=tiny_model, chunk=CHUNK, extra=f", exemplars: {exemplars}"))
    assert main(["run", str(cfg), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {exemplars}:") and "exemplars#2.rules: rule 70" in err
    assert len(err.splitlines()) == 1


def test_annotations_command_on_a_run_dir(reference, capsys: pytest.CaptureFixture[str]) -> None:
    _, run_dir, _ = reference
    assert main(["annotations", str(run_dir)]) == 0
    out = capsys.readouterr().out
    # stage 1's generators are off in this run, so only stage 2's files count
    assert "exemplars.yaml" in out and "principles.yaml" in out and "seed_tasks" not in out
    assert "budget 300: OK" in out
