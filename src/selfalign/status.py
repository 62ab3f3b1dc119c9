"""``selfalign status``: what a run directory holds and what is left."""

from __future__ import annotations

import json
from pathlib import Path

from selfalign.errors import InputError
from selfalign.registry import stage_names
from selfalign.stages.api import MANIFEST, RECORDS
from selfalign.store import read_records
from selfalign.validation import load_yaml


def describe_run(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    manifest_path = run_dir / MANIFEST
    if not manifest_path.is_file():
        raise InputError("not a run directory (no manifest.json)", file=run_dir)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON ({e.msg})", file=manifest_path) from None
    configured: list[str] = []
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        configured = list((load_yaml(config_path) or {}).get("stages", {}))
    entries = manifest.get("stages", {})
    order = [n for n in stage_names() if n in configured or n in entries]
    lines = [
        f"run: {run_dir}",
        f"{'stage':<10} {'status':<10} {'in':>7} {'out':>7} {'drop':>6}  time",
    ]
    left = []
    for name in order:
        entry = entries.get(name)
        if entry is None:
            lines.append(f"{name:<10} {'pending':<10}")
            left.append(name)
            continue
        counts = entry.get("counts", {})
        out = counts.get("out")
        if entry.get("status") != "complete":
            out = len(read_records(run_dir / name / RECORDS))
            left.append(name)
        seconds = entry.get("timings", {}).get("seconds", 0)
        lines.append(
            f"{name:<10} {entry.get('status', '?'):<10} {counts.get('in', '-'):>7} "
            f"{out if out is not None else '-':>7} {counts.get('dropped', '-'):>6}  {seconds:.0f}s"
        )
        for reason, n in entry.get("drop_reasons", {}).items():
            lines.append(f"{'':<12}dropped {n} x {reason}")
        if entry.get("error"):
            lines.append(f"{'':<12}error: {entry['error']}")
    lines.append("left: " + (", ".join(left) if left else "nothing, all stages complete"))
    return "\n".join(lines)
