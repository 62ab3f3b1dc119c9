"""What a stage cost: tokens, time, device-hours and money, from its manifest entry.

Pure arithmetic over what the runner records (``usage``: backend counters, ``timings``,
``stats``: the training summary) and the stage's resolved settings (the ``backend``
block and the training ``launch``); ``run_costs`` reads them from the run's config.yaml.
No torch, no model: ``status`` and ``report`` use it on any run directory, also one
written before costs were recorded (the runner stores each stage's ``cost`` when it ends).

Where time goes: a training stage's training seconds are the trainer's own ``runtime_s``
(MoTE: ``train_runtime``), the rest of the stage's wall time is generation; a stage that
sent no request spends all of it on its training devices. Devices: generation on the
stage's backend (``backend_devices``), training on ``launch.num_processes`` devices (MoTE
trains in-process: 1). Money: a backend with a token price is charged by its tokens, else
by its device-hours at ``price_per_device_hour``; training at the run-level block's
``price_per_device_hour``. A part with no price adds nothing; ``money`` is None when no
part has one, and ``currency_basis`` names what was charged: "tokens", "device-hours", or
"tokens+device-hours" (a priced API for generation, own devices for training).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from selfalign.backends.config import BackendConfig
from selfalign.backends.spec import parse_spec
from selfalign.errors import InputError
from selfalign.validation import describe_error, field_path, load_yaml

Cost = dict[str, Any]
COST_KEYS = ("prompt_tokens", "completion_tokens", "seconds", "device_hours", "money")


def backend_devices(backend: BackendConfig) -> int:
    """Devices a backend holds while it runs: ``devices`` when given, else hf 1, vllm its
    tensor-parallel size, openai 0 (a remote server's devices are not the run's)."""
    if backend.devices is not None:
        return backend.devices
    kind = parse_spec(backend.model).kind
    return {"hf": 1, "vllm": backend.tensor_parallel_size}.get(kind, 0)


def has_token_price(backend: BackendConfig) -> bool:
    return (
        backend.price_per_million_prompt_tokens is not None
        or backend.price_per_million_completion_tokens is not None
    )


def token_money(backend: BackendConfig, prompt_tokens: float, completion_tokens: float) -> float:
    return (
        prompt_tokens * (backend.price_per_million_prompt_tokens or 0.0)
        + completion_tokens * (backend.price_per_million_completion_tokens or 0.0)
    ) / 1e6


def training_seconds(stats: Mapping[str, Any]) -> float | None:
    """The trainer's own runtime, from a training stage's stats (None: not a training stage)."""
    if isinstance(stats.get("runtime_s"), int | float):
        return float(stats["runtime_s"])
    train = stats.get("train")
    if isinstance(train, Mapping) and isinstance(train.get("train_runtime"), int | float):
        return float(train["train_runtime"])
    return None


def training_tokens(stats: Mapping[str, Any]) -> int | None:
    """Tokens one epoch of training reads (SFT: ``train_tokens``; MoTE: ``train.tokens``)."""
    if isinstance(stats.get("train_tokens"), int):
        return stats["train_tokens"]
    train = stats.get("train")
    if isinstance(train, Mapping) and isinstance(train.get("tokens"), int):
        return train["tokens"]
    return None


def stage_backend(
    settings: Mapping[str, Any], run_backend: BackendConfig | None
) -> BackendConfig | None:
    """The stage's own backend block, else the run's."""
    block = settings.get("backend")
    if isinstance(block, BackendConfig):
        return block
    return BackendConfig.model_validate(block) if block else run_backend


def train_devices(settings: Mapping[str, Any]) -> int:
    launch = settings.get("launch")
    if isinstance(launch, Mapping):
        return int(launch.get("num_processes") or 1)
    return int(getattr(launch, "num_processes", 1) or 1)


def stage_cost(
    entry: Mapping[str, Any], settings: Mapping[str, Any], run_backend: BackendConfig | None
) -> Cost:
    """A stage's cost from its manifest ``entry``, its resolved ``settings`` (config.yaml's
    ``stages.NAME``, or ``StageConfig.model_dump()``) and the run-level backend block
    (None: unknown, as for a run directory without its config.yaml: tokens and time only)."""
    usage = entry.get("usage") or {}
    stats = entry.get("stats") or {}
    seconds = float((entry.get("timings") or {}).get("seconds") or 0.0)
    backend = stage_backend(settings, run_backend)
    prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    trained = training_seconds(stats)
    if trained is None:
        gen_s, train_s = seconds, 0.0
    elif usage.get("requests"):
        train_s = min(trained, seconds)
        gen_s = seconds - train_s
    else:
        gen_s, train_s = 0.0, seconds
    cost: Cost = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "train_tokens": training_tokens(stats),
        "seconds": round(seconds, 3),
        "device_hours": None,
        "money": None,
        "currency_basis": None,
    }
    if backend is None or run_backend is None:
        return cost
    gen_hours = gen_s * backend_devices(backend) / 3600
    train_hours = train_s * train_devices(settings) / 3600
    money, basis = charge(
        backend, run_backend, train_devices(settings), requests=bool(usage.get("requests")),
        prompt=prompt, completion=completion, gen_s=gen_s, train_s=train_s, trains=train_s > 0,
    )  # fmt: skip
    cost["device_hours"] = round(gen_hours + train_hours, 9)
    cost["money"] = None if money is None else round(money, 9)
    cost["currency_basis"] = basis
    return cost


def charge(
    backend: BackendConfig, run_backend: BackendConfig, train_devs: int, *, requests: bool,
    prompt: int, completion: int, gen_s: float | None, train_s: float | None, trains: bool,
) -> tuple[float | None, str | None]:  # fmt: skip
    """(money, what it is charged by) for one stage, spent or estimated: generation by its
    backend's token prices, else by its device-hours; training by the run backend's
    device-hour price on ``train_devs`` devices. Money is None when no price applies or a
    priced part's time is unknown (None); the basis still says what would be charged."""
    money, basis, unknown = 0.0, [], False
    if has_token_price(backend) and requests:
        money += token_money(backend, prompt, completion)
        basis.append("tokens")
    elif backend.price_per_device_hour is not None and requests:
        unknown |= gen_s is None
        money += (gen_s or 0.0) * backend_devices(backend) / 3600 * backend.price_per_device_hour
        basis.append("device-hours")
    if trains and run_backend.price_per_device_hour is not None:
        unknown |= train_s is None
        money += (train_s or 0.0) * train_devs / 3600 * run_backend.price_per_device_hour
        basis.append("device-hours")
    joined = "+".join(dict.fromkeys(basis)) or None
    return (None if unknown or not basis else money), joined


def total_cost(costs: Mapping[str, Cost]) -> Cost:
    """The sum over stages; money over the stages that have one (None if none has)."""
    total: Cost = {k: 0 for k in COST_KEYS}
    for cost in costs.values():
        for key in ("prompt_tokens", "completion_tokens", "seconds", "device_hours"):
            total[key] += cost.get(key) or 0
    priced = [c["money"] for c in costs.values() if c.get("money") is not None]
    total["money"] = round(sum(priced), 9) if priced else None
    bases = {b for c in costs.values() for b in str(c.get("currency_basis") or "").split("+") if b}
    total["currency_basis"] = "+".join(sorted(bases, reverse=True)) or None
    return total


def _backend_block(data: Any, file: Path, field: str) -> BackendConfig | None:
    """A backend block of a stored config.yaml, validated but not resolved: a model
    folder moved since the run must not stop anyone from looking at it."""
    if not data:
        return None
    try:
        return BackendConfig.model_validate(data)
    except ValidationError as e:
        loc, msg = describe_error(e)
        where = ".".join(p for p in (field, field_path(loc)) if p)
        raise InputError(msg, file=file, field=where) from None
    except InputError as e:
        raise InputError(e.detail, file=file, field=field) from None


def run_costs(run_dir: Path, entries: Mapping[str, Mapping[str, Any]]) -> dict[str, Cost]:
    """Every stage's cost: the one the runner recorded, else computed from the entry and
    the run's ``config.yaml`` (runs from before costs were recorded, running stages)."""
    config_path = Path(run_dir) / "config.yaml"
    config: dict[str, Any] = {}
    if config_path.is_file():
        loaded = load_yaml(config_path)
        config = loaded if isinstance(loaded, dict) else {}
    run_backend = _backend_block(config.get("backend"), config_path, "backend")
    if run_backend is None and config.get("model"):
        run_backend = BackendConfig(model=str(config["model"]))
    stage_settings = config.get("stages") or {}
    costs: dict[str, Cost] = {}
    for name, entry in entries.items():
        if isinstance(entry.get("cost"), Mapping):
            costs[name] = dict(entry["cost"])
            continue
        settings = dict(stage_settings.get(name) or {})
        settings["backend"] = _backend_block(
            settings.get("backend"), config_path, f"stages.{name}.backend"
        )
        costs[name] = stage_cost(entry, settings, run_backend)
    return costs


def format_tokens(n: float | None) -> str:
    """12345 -> '12.3k'; 2500000 -> '2.5M'."""
    if n is None:
        return "-"
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def format_money(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value >= 1 or value == 0 else f"{value:.4f}"


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"
