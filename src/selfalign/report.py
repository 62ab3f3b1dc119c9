"""``selfalign report RUN_DIR``: report.html with PNG plots beside it.

Plots: the funnel of records per stage with drop reasons, principle usage, answer length
before/after verbose cloning, training loss curves; plus a table of eval results. Every
plot is drawn only when the run has its data, so a partial run still gets a report.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from selfalign.cost import Cost, format_money, run_costs, total_cost  # noqa: E402
from selfalign.errors import InputError  # noqa: E402
from selfalign.store import atomic_write_text, read_manifest, read_records  # noqa: E402
from selfalign.validation import load_yaml  # noqa: E402

PLOTS_DIR = "report_files"


def _save(fig: plt.Figure, out: Path) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return f"{PLOTS_DIR}/{out.name}"


def plot_funnel(stages: dict[str, Any], out: Path) -> str | None:
    # Stages that pass items along; training stages commit no records and eval's are results.
    rows = [
        (n, e)
        for n, e in stages.items()
        if n != "eval" and e.get("counts", {}).get("out", 0) + e.get("counts", {}).get("dropped", 0)
    ]
    if not rows:
        return None
    reasons = sorted({r for _, e in rows for r in e.get("drop_reasons", {})})
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(rows) + 2.5))
    names = [n for n, _ in rows]
    kept = [e["counts"].get("out", 0) for _, e in rows]
    ax.barh(names, kept, color="#2a9d8f", label="kept")
    left = list(kept)
    cmap = plt.get_cmap("tab20")
    for i, reason in enumerate(reasons):
        values = [e.get("drop_reasons", {}).get(reason, 0) for _, e in rows]
        ax.barh(names, values, left=left, color=cmap(i % 20), label=f"dropped: {reason}")
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("records")
    ax.set_title("Records per stage: kept and dropped (by reason)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, out)


def plot_principles(usage: dict[str, int], out: Path) -> str | None:
    if not usage:
        return None
    items = sorted(usage.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar([str(k) for k, _ in items], [v for _, v in items], color="#264653")
    ax.set_xlabel("principle")
    ax.set_ylabel("times cited in internal thoughts")
    ax.set_title("Principle usage (stage 2)")
    return _save(fig, out)


def _answer_lengths(path: Path) -> list[int]:
    if not path.is_file():
        return []
    return [len(str(r.get("answer", "")).split()) for r in read_records(path)]


def plot_lengths(before: list[int], after: list[int], out: Path) -> str | None:
    if not before and not after:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for values, label, color in ((before, "principle-driven (stage 2)", "#e9c46a"),
                                 (after, "verbose cloning (stage 4)", "#e76f51")):  # fmt: skip
        if values:
            mean = sum(values) / len(values)
            ax.hist(values, bins=30, alpha=0.6, label=f"{label}: mean {mean:.1f}", color=color)
    ax.set_xlabel("answer length (words)")
    ax.set_ylabel("answers")
    ax.set_title("Answer length before and after verbose cloning")
    ax.legend()
    return _save(fig, out)


def _loss_series(log: dict[str, Any]) -> list[tuple[float, float]]:
    history = log.get("loss_history") or log.get("history") or []
    return [(h.get("step", i), h["loss"]) for i, h in enumerate(history) if "loss" in h]


def plot_losses(logs: dict[str, dict[str, Any]], out: Path) -> str | None:
    series = {name: _loss_series(log) for name, log in logs.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for name, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title("Training loss")
    ax.legend()
    return _save(fig, out)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _eval_rows(run_dir: Path) -> list[list[Any]]:
    rows = []
    for path in sorted((run_dir / "eval").glob("*.json")):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        if result.get("benchmark") == "heldout":
            continue  # shown side by side with its answers
        for m in result.get("metrics", []):
            value = m.get("value")
            shown = f"{value:.4f}" if isinstance(value, float) else value
            rows.append([result.get("benchmark", path.stem), result.get("protocol", ""),
                         m.get("metric"), shown, m.get("n"), result.get("model", "")])  # fmt: skip
    return rows


SAFETY_ORDER = ("help", "over_refusal_rate", "harm", "harm_help", "xstest_compliance",
                "refusal_strmatch")  # fmt: skip


def _eval_models(run_dir: Path) -> list[str]:
    """The eval stage's ``models`` as the run's config lists them ([] when unreadable)."""
    try:
        config = load_yaml(run_dir / "config.yaml")
        models = config["stages"]["eval"]["models"]
    except (InputError, KeyError, TypeError):
        return []
    return [str(m) for m in models] if isinstance(models, list) else []


def safety_table(run_dir: Path) -> tuple[list[str], list[list[Any]]]:
    """MoTE's table: one row per model (``mote:{method}`` rows included) in the config's
    order, one column per (metric, prompt file), as the safety results give them; the
    judge and protocol last."""
    by_model: dict[str, dict[str, Any]] = {}
    judges: dict[str, str] = {}
    for path in sorted((run_dir / "eval").glob("*-safety-*.json")):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        model = str(result.get("model", path.stem))
        cells = by_model.setdefault(model, {})
        for m in result.get("metrics", []):
            cells[m["metric"]] = (m["value"], m.get("n"))
        details = result.get("details") or {}
        judges[model] = f"{details.get('judge', '')} ({result.get('protocol', '')})"
    columns = sorted({c for cells in by_model.values() for c in cells},
                     key=lambda c: (SAFETY_ORDER.index(c.split("/")[0])
                                    if c.split("/")[0] in SAFETY_ORDER else 99, c))  # fmt: skip
    order = _eval_models(run_dir)
    models = sorted(by_model, key=lambda m: (order.index(m) if m in order else len(order), m))
    rows = [
        [model, *(f"{by_model[model][c][0]:.2f} (n={by_model[model][c][1]})"
                  if c in by_model[model] else "" for c in columns), judges[model]]
        for model in models
    ]  # fmt: skip
    return ["model", *columns, "judge (protocol)"], rows


EXAMPLES_PER_REASON = 3
_EXCERPT_CHARS = 400


def _excerpt(text: object) -> str:
    text = str(text)
    return text if len(text) <= _EXCERPT_CHARS else text[:_EXCERPT_CHARS] + " [...]"


def _drop_examples(run_dir: Path, stages: dict[str, Any]) -> list[str]:
    """Per stage and drop reason: its count and the first few dropped items, so a reader
    can judge whether the filter or the model is at fault."""
    parts = []
    for name in stages:
        path = run_dir / name / "dropped.jsonl"
        if not path.is_file():
            continue
        by_reason: dict[str, list[dict[str, Any]]] = {}
        for record in read_records(path):
            by_reason.setdefault(str(record.get("reason")), []).append(record)
        rows = []
        for reason, records in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            for r in records[:EXAMPLES_PER_REASON]:
                asked = r.get("prompt") or r.get("instruction") or r.get("topic") or ""
                said = (r.get("output") or r.get("answer") or r.get("raw") or r.get("rejected")
                        or " | ".join(r.get("answers") or []) or r.get("input") or "")  # fmt: skip
                rows.append([reason, len(records), _excerpt(asked), _excerpt(said)])
        if rows:
            parts += [f"<h3>{html.escape(name)}</h3>",
                      _table(["reason", "count", "item", "what the model wrote"], rows)]  # fmt: skip
    return parts


MODEL_ORDER = ("base", "base_icl", "engraved", "final", "dpo", "mote")  # columns, left to right


def _heldout_parts(run_dir: Path) -> list[str]:
    """The held-out prompts answered by every model, side by side."""
    results = {}
    for path in sorted((run_dir / "eval").glob("*-heldout-greedy.json")):
        try:
            result = json.loads(path.read_text("utf-8"))
        except json.JSONDecodeError:
            continue
        if isinstance(result, dict) and {"metrics", "answers"} <= set(result):
            results[path.stem.removesuffix("-heldout-greedy")] = result
    if not results:
        return []
    models = sorted(results, key=lambda m: (MODEL_ORDER.index(m) if m in MODEL_ORDER else 99, m))
    metric_names = list(dict.fromkeys(m["metric"] for r in results.values() for m in r["metrics"]))
    summary = [
        [metric, *(_fmt(next((m["value"] for m in results[model]["metrics"]
                              if m["metric"] == metric), "")) for model in models)]
        for metric in metric_names
    ]  # fmt: skip
    answers = {model: {a["id"]: a for a in results[model]["answers"]} for model in models}
    rows = []
    for a in results[models[0]]["answers"]:
        cells = [f"{a['kind']}: {a['prompt']}"]
        for model in models:
            b = answers[model].get(a["id"])
            if b is None:
                cells.append("")
                continue
            end = "ended by itself" if b["self_stop"] else "hit the token limit"
            flag = "; refusal" if b["refusal"] else ""
            steps = f"; wrote {'+'.join(b['steps'])}" if b.get("steps") else ""
            cells.append(f"{_excerpt(b['answer'])}\n[{b['chars']} chars, {end}{flag}{steps}]")
        rows.append(cells)
    return [
        "<h2>Held-out prompts, side by side</h2>",
        "<p>Greedy answers to prompts no stage trained on. An answer ended by itself when the "
        "model wrote its end-of-sequence token or began a next turn. Refusals are counted by a phrase "
        "classifier (see <code>selfalign.eval.heldout.is_refusal</code>): it misses refusals "
        "worded otherwise and counts a polite decline followed by an answer.</p>",
        _table(["metric", *models], summary),
        _table(["prompt", *models], rows),
    ]


def _fmt(value: object) -> object:
    return f"{value:.3f}" if isinstance(value, float) else value


def _aligned_rows(stats: dict[str, Any]) -> list[list[Any]]:
    """Stage 2's answer statistics as (statistic, value) rows; none for a run without them."""
    if "answer_chars" not in stats:
        return []

    def ratios(counts: dict[str, dict[str, int]]) -> str:
        return ", ".join(f"{k}: {v['refused']}/{v['prompts']}" for k, v in counts.items()) or "-"

    chars = stats["answer_chars"]
    refusals = stats.get("refusals", {})
    return [
        ["kept answers trimmed at a repeat", f"{stats.get('trimmed_share', 0):.1%}"],
        ["kept answers stopped by the token limit", f"{stats.get('truncated_share', 0):.1%}"],
        ["kept answers citing a rule by a wrong name", f"{stats.get('misnamed_share', 0):.1%}"],
        ["kept answer length (chars): mean, p10, p50, p90",
         ", ".join(str(chars.get(k, "-")) for k in ("mean", "p10", "p50", "p90"))],
        ["refusals per prompt source", ratios(refusals.get("by_source", {}))],
        ["refusals per red-team type", ratios(refusals.get("by_type", {}))],
        ["leaks per copied text",
         ", ".join(f"{k}: {v}" for k, v in stats.get("leak_sources", {}).items()) or "-"],
    ]  # fmt: skip


def _chain_rows(chains: dict[str, Any], mote: dict[str, Any]) -> list[list[Any]]:
    """The AlignCoT chains (length mix, self-checks) and the MoTE training, as rows."""
    rows: list[list[Any]] = []
    if "chains_by_length" in chains:
        checks = chains.get("checks", {})
        rows += [
            ["chains by length", ", ".join(f"{k}: {v}" for k, v in chains["chains_by_length"].items())],
            ["self-checks", f"{checks.get('method')}: {checks.get('safe', 0)} safe, "
             f"{checks.get('unsafe', 0)} unsafe, {checks.get('unparsed', 0)} unparsed "
             f"of {checks.get('total', 0)} (not checked, so unsafe: "
             f"{checks.get('empty_answer', 0)} empty answers, "
             f"{checks.get('echo_answer', 0)} echoes of the question)"],
            ["steps cut by the token limit",
             ", ".join(f"{k}: {v}" for k, v in chains.get("truncated_steps", {}).items()) or "-"],
            ["steps cut before a repeated clause",
             ", ".join(f"{k}: {v}" for k, v in chains.get("trimmed_steps", {}).items()) or "-"],
            ["steps cut before a copy of the prompt's instructions",
             ", ".join(f"{k}: {v}" for k, v in chains.get("copied_steps", {}).items()) or "-"],
        ]  # fmt: skip
    train = mote.get("train", {})
    if train:
        rows.append(["MoTE training", ", ".join(f"{k}: {_fmt(v)}" for k, v in train.items())])
    return rows


PAIR_EXAMPLES = 3  # preference pairs shown per source


def _preference_parts(run_dir: Path, stages: dict[str, Any]) -> list[str]:
    """The pairs per source (counts, lengths, the judge's agreement), DPO's training, and
    the first few kept pairs, so a reader sees what the model was taught to prefer."""
    stats = stages.get("preferences", {}).get("stats") or {}
    rows: list[list[Any]] = [
        [source, ", ".join(f"{k}: {_fmt(v)}" for k, v in entry.items())]
        for source, entry in stats.items()
        if isinstance(entry, dict)
    ]
    dpo = stages.get("dpo", {}).get("stats") or {}
    if dpo:
        keys = ("examples", "global_step", "initial_loss", "final_loss", "rewards_margins",
                "rewards_accuracies", "runtime_s")  # fmt: skip
        rows.append(["DPO training", ", ".join(f"{k}: {_fmt(dpo[k])}" for k in keys if k in dpo)])
    if not rows:
        return []
    parts = ["<h2>Preference pairs and DPO</h2>", _table(["", "value"], rows)]
    pairs = read_records(run_dir / "preferences" / "records.jsonl")
    shown = [
        [r["source"], r.get("principle") or "-", _excerpt(r["prompt"]), _excerpt(r["chosen"]),
         _excerpt(r["rejected"])]
        for source in ("contrast", "self_judged")
        for r in [r for r in pairs if r["source"] == source][:PAIR_EXAMPLES]
    ]  # fmt: skip
    if shown:
        parts.append(_table(["source", "principle", "prompt", "chosen", "rejected"], shown))
    return parts


def _trained_model_parts(stages: dict[str, Any]) -> list[str]:
    """Per trained model: does it end its turn by itself, and does its saved chat template
    reproduce the ids it was trained on (a red warning where either fails)."""
    rows, warnings = [], []
    for name, entry in stages.items():
        stats = entry.get("stats") or {}
        turn, template = stats.get("turn_end"), stats.get("template_check")
        if not turn and not template:
            continue
        if turn and "rate" in turn:
            ended = (f"{turn['ended']}/{turn['prompts']} ({turn['rate']:.0%}) "
                     f"within {turn['max_new_tokens']} tokens")  # fmt: skip
            nxt = turn.get("next_turn", 0)
            if not turn["ok"]:
                warnings.append(
                    f"{name}: ended its turn on only {turn['rate']:.0%} of held-out "
                    f"prompts (warning threshold {turn['min_rate']:.0%})"
                )
        else:
            ended, nxt = (turn or {}).get("skipped", "not checked"), "-"
        if template:
            same = (f"{template['identical']}/{template['examples']} identical; end token "
                    f"{template['end_token']} trained in {template['end_trained']}")  # fmt: skip
            if not template["ok"]:
                warnings.append(
                    f"{name}: the saved chat template does not reproduce the trained ids"
                )
        else:
            same = "-"
        rows.append([name, ended, nxt, same])
    if not rows:
        return []
    parts = [
        "<h2>Trained models: end of turn and chat template</h2>",
        _table(
            [
                "stage",
                "ended its turn (own template, greedy, no stop strings)",
                "started the next user turn",
                "template round trip",
            ],
            rows,
        ),
    ]
    parts += [
        f"<p style='color:#b00;font-weight:bold'>WARNING: {html.escape(w)}</p>" for w in warnings
    ]
    return parts


STAGE_COLUMNS = ["stage", "status", "in", "out", "dropped", "drop reasons", "seconds", "peak MiB",
                 "prompt tokens", "completion tokens", "trained tokens", "device-hours",
                 "money"]  # fmt: skip


def _cost_cells(cost: Cost) -> list[Any]:
    """Tokens in and out, tokens trained on (one epoch), device-hours and money (with what
    it was charged by; ``-`` where the config gives no price: ``selfalign.cost``)."""
    hours, money = cost.get("device_hours"), cost.get("money")
    basis = cost.get("currency_basis") if money is not None else None
    basis = f" ({basis})" if basis else ""
    return [cost.get("prompt_tokens", 0), cost.get("completion_tokens", 0),
            cost.get("train_tokens") or "", "-" if hours is None else f"{hours:.4f}",
            format_money(money) + basis]  # fmt: skip


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    stages = read_manifest(run_dir).get("stages", {})
    plots = run_dir / PLOTS_DIR
    logs = {
        p.parent.relative_to(run_dir).as_posix(): json.loads(p.read_text(encoding="utf-8"))
        for p in sorted(run_dir.glob("*/**/train_log.json"))
    }
    usage = (stages.get("aligned", {}).get("stats") or {}).get("principle_usage", {})
    figures = [
        ("Funnel", plot_funnel(stages, plots / "funnel.png")),
        ("Principle usage", plot_principles(usage, plots / "principles.png")),
        ("Answer length", plot_lengths(
            _answer_lengths(run_dir / "aligned" / "records.jsonl"),
            _answer_lengths(run_dir / "verbose" / "records.jsonl"),
            plots / "answer_lengths.png",
        )),
        ("Training loss", plot_losses(logs, plots / "loss.png")),
    ]  # fmt: skip
    costs = run_costs(run_dir, stages)
    stage_rows = [
        [name, e.get("status"), e.get("counts", {}).get("in", ""), e.get("counts", {}).get("out", ""),
         e.get("counts", {}).get("dropped", ""),
         ", ".join(f"{k}: {v}" for k, v in e.get("drop_reasons", {}).items()),
         f"{e.get('timings', {}).get('seconds', 0):.1f}",
         e.get("timings", {}).get("peak_rss_mb", ""), *_cost_cells(costs[name])]
        for name, e in stages.items()
    ]  # fmt: skip
    if costs:
        total = total_cost(costs)
        stage_rows.append(["total", "", "", "", "", "", f"{total['seconds']:.1f}", "",
                           *_cost_cells(total)])  # fmt: skip
    parts = [
        f"<h1>selfalign run: {html.escape(run_dir.name)}</h1>",
        "<h2>Stages</h2>",
        _table(STAGE_COLUMNS, stage_rows),
    ]
    parts += _trained_model_parts(stages)
    aligned_rows = _aligned_rows(stages.get("aligned", {}).get("stats") or {})
    if aligned_rows:
        parts += ["<h2>Stage 2 answers</h2>", _table(["statistic", "value"], aligned_rows)]
    parts += _preference_parts(run_dir, stages)
    chain_rows = _chain_rows(
        stages.get("chains", {}).get("stats") or {}, stages.get("mote", {}).get("stats") or {}
    )
    if chain_rows:
        parts += ["<h2>Reasoning chains and MoTE</h2>", _table(["statistic", "value"], chain_rows)]
    eval_rows = _eval_rows(run_dir)
    if eval_rows:
        parts += ["<h2>Evaluation</h2>",
                  _table(["benchmark", "protocol", "metric", "value", "n", "model"], eval_rows)]  # fmt: skip
    header, safety_rows = safety_table(run_dir)
    if safety_rows:
        parts += ["<h2>Safety: Help / Harm / Harm-Help / XSTest per model and prompt file</h2>",
                  _table(header, safety_rows)]  # fmt: skip
    parts += _heldout_parts(run_dir)
    examples = _drop_examples(run_dir, stages)
    if examples:
        parts += [f"<h2>What each filter dropped ({EXAMPLES_PER_REASON} examples per reason)</h2>",
                  *examples]  # fmt: skip
    for title, src in figures:
        if src:
            parts.append(
                f"<h2>{html.escape(title)}</h2><img src='{src}' alt='{html.escape(title)}'>"
            )
    style = (
        "body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "font-size:13px;text-align:left;vertical-align:top;white-space:pre-wrap}img{max-width:100%}"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>selfalign report</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n"
    )
    out = run_dir / "report.html"
    atomic_write_text(out, page)
    return out
