"""scripts/gpu_check.py (the one-shot GPU check) runs its three parts on the CPU with tiny
dims and writes one JSON with every part's numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_smoke_writes_every_part(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    tiny = ["--gen-batch", "2", "--gen-prefix-tokens", "16", "--gen-new-tokens", "2",
            "--lora-seq", "16", "--lora-steps", "1", "--mote-chains", "4"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu-smoke", "--out", str(out),
         *tiny],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    report = json.loads(out.read_text())
    errors = {p: report[p].get("traceback") for p in ("generate", "lora", "mote")}
    assert proc.returncode == 0, (proc.stderr[-3000:], errors)
    assert report["mode"] == "cpu-smoke" and report["environment"]["device"] == "cpu"
    assert "vllm" in report
    gen = report["generate"]
    assert gen["all_rows_full_length"] and gen["completion_tokens"] == 2 * 2
    assert set(gen["tokens_per_s"]) == {"generate", "ours_prefill_included", "ours_prefix_cached"}
    assert gen["ratio_vs_generate"]["ours_prefix_cached"] > 0
    lora = report["lora"]
    assert lora["seconds_per_step"] > 0 and lora["tokens_per_s"] > 0
    assert lora["lora"]["r"] == 16 and lora["gradient_checkpointing"]
    mote = report["mote"]
    assert mote["packed"]["tokens"] < mote["expanded"]["tokens"]
    assert mote["time_ratio"] > 0 and 0 < mote["flops_ratio"] < 1 and mote["step_time_ratio"] > 0
