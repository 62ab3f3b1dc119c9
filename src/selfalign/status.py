"""``selfalign status``: what a run directory holds and what is left."""

from __future__ import annotations

from pathlib import Path

from selfalign.cost import format_money, format_seconds, format_tokens, run_costs, total_cost
from selfalign.environment import compare
from selfalign.registry import stage_names
from selfalign.stages.api import RECORDS
from selfalign.store import read_manifest, read_records
from selfalign.validation import load_yaml


def describe_run(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    configured: list[str] = []
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        configured = list((load_yaml(config_path) or {}).get("stages", {}))
    entries = manifest.get("stages", {})
    order = [n for n in stage_names() if n in configured or n in entries]
    costs = run_costs(run_dir, {n: entries[n] for n in order if n in entries})
    lines = [
        f"run: {run_dir}",
        f"{'stage':<10} {'status':<10} {'in':>7} {'out':>7} {'drop':>6} {'time':>7}"
        f" {'tok in':>7} {'tok out':>7} {'dev-h':>7} {'money':>8}",
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
        lines.append(
            f"{name:<10} {entry.get('status', '?'):<10} {counts.get('in', '-'):>7} "
            f"{out if out is not None else '-':>7} {counts.get('dropped', '-'):>6} "
            + _cost_columns(costs[name])
        )
        if costs[name].get("train_tokens"):
            lines.append(f"{'':<12}trained on {format_tokens(costs[name]['train_tokens'])} tokens")
        for reason, n in entry.get("drop_reasons", {}).items():
            lines.append(f"{'':<12}dropped {n} x {reason}")
        if entry.get("error"):
            lines.append(f"{'':<12}error: {entry['error']}")
    if costs:
        total = total_cost(costs)
        lines.append(f"{'total':<10} {'':<10} {'':>7} {'':>7} {'':>6} " + _cost_columns(total))
        if total["money"] is not None:
            lines.append(f"{'':<12}money charged by {total['currency_basis']}")
    environments = list(manifest.get("environments", {}).values())  # selfalign.environment
    if len(environments) > 1:
        differ = compare(environments[0], environments[-1])
        lines.append(f"environments: {len(environments)}; the first and the latest differ in "
                     + ", ".join(differ))  # fmt: skip
    lines.append("left: " + (", ".join(left) if left else "nothing, all stages complete"))
    return "\n".join(lines)


def _cost_columns(cost: dict) -> str:
    """Time, tokens in and out, device-hours and money (``-`` where no price is given)."""
    hours = cost.get("device_hours")
    return (
        f"{format_seconds(cost.get('seconds') or 0):>7} {format_tokens(cost['prompt_tokens']):>7} "
        f"{format_tokens(cost['completion_tokens']):>7} "
        f"{'-' if hours is None else f'{hours:.3f}':>7} {format_money(cost.get('money')):>8}"
    )
