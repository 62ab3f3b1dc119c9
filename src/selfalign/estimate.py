"""``run --dry-run``'s estimates: tokens, time and money for the stages a run would run.

Each stage says how much work it will be (``Stage.estimate``: rough upper bounds from its
settings' sizes, its inputs counted from the upstream stages: their real record counts
when complete, else their own estimates). Time is the completion tokens over a
throughput: the stage's ``backend.throughput_tokens_per_s``, else the one an earlier run
of the same stage measured in this run directory (its completion tokens over its
generation seconds), else unknown, and said so. Training time is an earlier run's
seconds per example, else the stage's training token bound over the run's
``throughputs`` (``train_tokens_per_s``, or the 8B LoRA tokens/s of a
``scripts/gpu_check.sh`` JSON), else unknown. Money as ``selfalign.cost`` charges a
finished stage. A stage to resume is estimated whole (an upper bound on what it has
left). Reads only: nothing is written, no model is loaded (a local model's
``tokenizer.json`` is read with the ``tokenizers`` library to count prompt tokens).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfalign.backends.config import BackendConfig
from selfalign.backends.spec import parse_spec
from selfalign.config import RunConfig, StageConfig
from selfalign.cost import (
    charge,
    format_money,
    format_seconds,
    format_tokens,
    train_devices,
    training_seconds,
)
from selfalign.errors import InputError
from selfalign.stages.api import Estimate, EstimateContext

NO_THROUGHPUT = "no throughput: set backend.throughput_tokens_per_s, or run the stage once"


def token_counter(model: str) -> Callable[[str], int]:
    """Tokens of a text under the model's own tokenizer (its ``tokenizer.json``), else
    about four characters a token (a remote model, or a folder without one)."""
    path = parse_spec(model).path
    file = path / "tokenizer.json" if path is not None else None
    if file is not None and file.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(file))

        @functools.lru_cache(maxsize=4096)
        def count(text: str) -> int:
            return len(tokenizer.encode(text, add_special_tokens=False).ids) if text else 0

        return count
    return lambda text: math.ceil(len(text) / 4)


def typical_prompt_tokens(count: Callable[[str], int]) -> int:
    """The mean tokens of a shipped seed task's user turn: the size taken for prompts that
    earlier stages have not written yet."""
    from selfalign.annotations.loaders import load_seed_tasks
    from selfalign.stages.prompts import prompt_text

    seeds = load_seed_tasks()
    texts = [prompt_text({"instruction": s.instruction, "input": s.input}) for s in seeds]
    return round(sum(map(count, texts)) / len(texts)) if texts else 0


@dataclass(frozen=True)
class StageEstimate:
    name: str
    estimate: Estimate
    throughput: float | None  # completion tokens per second
    throughput_source: str | None
    generation_s: float | None  # None: unknown
    training_s: float | None
    training_source: str | None  # how training_s was found
    money: float | None
    currency_basis: str | None
    priced: bool  # some price applies to this stage


def measured_rates(entry: Mapping[str, Any] | None) -> tuple[float | None, float | None]:
    """(completion tokens per generation second, training seconds per example) an earlier
    run of the stage measured, where it did."""
    if not entry:
        return None, None
    usage, stats = entry.get("usage") or {}, entry.get("stats") or {}
    seconds = float((entry.get("timings") or {}).get("seconds") or 0.0)
    trained = training_seconds(stats)
    throughput = None
    gen_s = seconds - (trained or 0.0)
    if usage.get("completion_tokens") and gen_s > 0:
        throughput = usage["completion_tokens"] / gen_s
    per_example = None
    examples = stats.get("examples")
    if not isinstance(examples, int):
        examples = (stats.get("train") or {}).get("examples")
    if trained and isinstance(examples, int) and examples > 0:
        per_example = trained / examples
    return throughput, per_example


def train_throughput(run: RunConfig) -> tuple[float, str] | None:
    """(training tokens/s, where it came from) from the run's ``throughputs`` block."""
    given = run.throughputs
    if given.train_tokens_per_s is not None:
        return given.train_tokens_per_s, "throughputs.train_tokens_per_s"
    if given.gpu_check is not None:
        return gpu_check_train_speed(given.gpu_check)
    return None


def gpu_check_train_speed(path: Path) -> tuple[float, str]:
    """The LoRA part of a ``scripts/gpu_check.sh`` JSON: (tokens/s, what was measured)."""
    field = "throughputs.gpu_check"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(
            f"not a readable JSON file ({type(e).__name__})", file=path, field=field
        ) from None
    lora = data.get("lora") if isinstance(data, dict) else None
    speed = lora.get("tokens_per_s") if isinstance(lora, dict) else None
    if not isinstance(speed, int | float) or isinstance(speed, bool) or not speed > 0:
        why = (lora or {}).get("error") or (lora or {}).get("skipped") or "no such part"
        raise InputError(f"has no lora.tokens_per_s ({str(why)[:120]})", file=path, field=field)
    device = (data.get("environment") or {}).get("device", "an unnamed device")
    rank = (lora.get("lora") or {}).get("r", "?")
    what = f"8B {lora.get('dtype', '?')} LoRA r={rank}, seq {lora.get('seq', '?')}"
    return float(speed), f"scripts/gpu_check.sh on {device}: {what}"


def estimate_stage(
    name: str,
    estimate: Estimate,
    config: StageConfig,
    run: RunConfig,
    entry: Mapping[str, Any] | None,
    train_speed: tuple[float, str] | None = None,
) -> StageEstimate:
    backend: BackendConfig = getattr(config, "backend", None) or run.generation_backend()
    run_backend = run.generation_backend()
    measured, per_example = measured_rates(entry)
    if backend.throughput_tokens_per_s is not None:
        throughput, source = backend.throughput_tokens_per_s, "backend.throughput_tokens_per_s"
    elif measured is not None:
        throughput, source = measured, "measured by an earlier run"
    else:
        throughput, source = None, None
    generation_s: float | None = 0.0
    if estimate.completion_tokens:
        generation_s = estimate.completion_tokens / throughput if throughput else None
    training_s: float | None = 0.0
    training_source = None
    if estimate.train_examples:
        training_s = None
        if per_example is not None:
            training_s = estimate.train_examples * per_example
            training_source = f"{per_example:.2f}s per example, measured by an earlier run"
        elif train_speed is not None and estimate.train_tokens:
            training_s = estimate.train_tokens / train_speed[0]
            training_source = (
                f"at most {format_tokens(estimate.train_tokens)} tokens at "
                f"{train_speed[0]:,.0f} tokens/s, {train_speed[1]}"
            )
    money, basis = charge(
        backend, run_backend, train_devices(config.model_dump(mode="json")),
        requests=bool(estimate.requests), prompt=estimate.prompt_tokens,
        completion=estimate.completion_tokens, gen_s=generation_s, train_s=training_s,
        trains=bool(estimate.train_examples),
    )  # fmt: skip
    return StageEstimate(
        name, estimate, throughput, source, generation_s, training_s,
        training_source, money, basis, basis is not None,
    )  # fmt: skip


def estimate_plan(
    run: RunConfig, plan: Sequence[Any], manifest: Mapping[str, Any]
) -> dict[str, StageEstimate | None]:
    """An estimate for each plan item that will run (None for a stage that gives none).
    ``plan``: the runner's ``PlanItem``s, upstream first; ``manifest``: its data."""
    if all(item.action == "reuse" for item in plan):
        return {}  # nothing will run: no tokenizer to read
    entries = manifest.get("stages", {})
    upstream = {
        name: int((e.get("counts") or {}).get("out") or 0)
        for name, e in entries.items()
        if e.get("status") == "complete"
    }
    count = token_counter(run.model)
    typical = typical_prompt_tokens(count)
    train_speed = train_throughput(run)
    out: dict[str, StageEstimate | None] = {}
    for item in plan:
        name = item.stage.name
        if item.action == "reuse":
            continue
        stage = item.stage
        if stage.estimate is None:
            out[name] = None
            upstream.pop(name, None)
            continue
        ectx = EstimateContext(run, dict(upstream), count, typical)
        est = stage.estimate(item.config, ectx)
        upstream[name] = est.outputs
        out[name] = estimate_stage(name, est, item.config, run, entries.get(name), train_speed)
    return out


def _time_text(e: StageEstimate) -> str:
    parts = []
    if e.estimate.completion_tokens:
        if e.generation_s is None:
            parts.append(f"generation unknown ({NO_THROUGHPUT})")
        else:
            parts.append(
                f"{format_seconds(e.generation_s)} generating at {e.throughput:,.0f} tokens/s "
                f"({e.throughput_source})"
            )
    if e.estimate.train_examples:
        if e.training_s is None:
            parts.append(
                "training unknown (no earlier run of this stage measured it; set "
                "throughputs.train_tokens_per_s or throughputs.gpu_check)"
            )
        else:
            parts.append(f"{format_seconds(e.training_s)} training ({e.training_source})")
    if parts:
        return " + ".join(parts)
    return "not estimated (its requests generate nothing)" if e.estimate.requests else "none"


def _money_text(money: float | None, basis: str | None, priced: bool) -> str:
    if not priced:
        return "no price set"
    if money is None:
        return "unknown (a priced part has no time estimate)"
    return f"{format_money(money)} (by {basis})"


def describe_estimate(e: StageEstimate | None) -> list[str]:
    """The lines ``run --dry-run`` prints under a stage's plan line."""
    pad = " " * 13
    if e is None:
        return [f"{pad}estimate: this stage gives none"]
    est = e.estimate
    work = []
    if est.requests:
        work.append(
            f"{est.requests:,} requests, {format_tokens(est.prompt_tokens)} prompt + "
            f"{format_tokens(est.completion_tokens)} completion tokens"
        )
    if est.train_examples is not None:
        work.append(f"{est.train_examples:,} training examples")
    lines = [f"{pad}estimate: at most " + (", ".join(work) or "nothing to do")]
    if est.note:
        lines.append(f"{pad}  ({est.note})")
    lines.append(
        f"{pad}time: {_time_text(e)}; cost: {_money_text(e.money, e.currency_basis, e.priced)}"
    )
    return lines


def describe_total(estimates: Mapping[str, StageEstimate | None]) -> list[str]:
    known = [e for e in estimates.values() if e is not None]
    if not known:
        return []
    requests = sum(e.estimate.requests for e in known)
    prompt = sum(e.estimate.prompt_tokens for e in known)
    completion = sum(e.estimate.completion_tokens for e in known)
    unknown = [f"{e.name} {part}" for e in known
               for part, t in (("generation", e.generation_s), ("training", e.training_s))
               if t is None]  # fmt: skip
    seconds = sum((e.generation_s or 0.0) + (e.training_s or 0.0) for e in known)
    time = format_seconds(seconds)
    if unknown:
        time = f"at least {time}" if seconds else "unknown"
        time += f" ({', '.join(unknown)} unknown)"
    priced = [e for e in known if e.priced]
    money = None
    if priced and all(e.money is not None for e in priced):
        money = sum(e.money or 0.0 for e in priced)
    bases = {b for e in priced for b in str(e.currency_basis or "").split("+") if b}
    money_text = _money_text(money, "+".join(sorted(bases, reverse=True)), bool(priced))
    return [
        f"  {'total':<10} estimate: at most {requests:,} requests, {format_tokens(prompt)} prompt "
        f"+ {format_tokens(completion)} completion tokens; time: {time}; cost: {money_text}"
    ]
