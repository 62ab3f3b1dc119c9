"""``selfalign eval lm-eval``: lm-evaluation-harness tasks through our backends.

Tasks are found by lm-eval's ``TaskManager`` (its own tasks, ``--include-path`` folders
and, with ``--truthfulqa-data``, our local ``truthfulqa_mc1``/``truthfulqa_mc2``), built
before the model is loaded (a bad name or a dataset that cannot be loaded fails first),
then run by ``lm_eval.evaluator.evaluate`` on a ``BackendLM``. lm_eval is imported only
here and in ``harness`` (the ``lm-eval`` extra).
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import random
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from selfalign.backends.base import Backend
from selfalign.errors import InputError
from selfalign.eval.results import EvalResult, Metric, data_ref

# lm-eval's own defaults for the python, numpy, torch and few-shot seeds (its CLI's --seed)
DEFAULT_SEEDS = (0, 1234, 1234, 1234)


def require_lm_eval() -> str:
    """lm_eval's version; a one-line InputError where it is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise InputError(
            "install selfalign[lm-eval] (pip install lm_eval)", field="eval lm-eval"
        ) from None
    from importlib.metadata import version

    return version("lm_eval")


def task_manager(
    names: Sequence[str], include_paths: Sequence[Path], truthfulqa_data: Path | None
) -> Any:
    """A ``TaskManager`` that knows every name asked for, or an InputError naming the
    first unknown one. Indexing lm-eval's ~15k task files takes seconds, so when the local
    folders define every name asked for, only they are indexed."""
    from selfalign.eval.lm_eval_tasks import DATA_KEY, TASKS_DIR

    for path in include_paths:
        if not path.is_dir():
            raise InputError("not a folder of task files", file=path, field="--include-path")
    local = ([TASKS_DIR] if truthfulqa_data is not None else []) + list(include_paths)
    metadata = ((DATA_KEY, str(truthfulqa_data)),) if truthfulqa_data is not None else ()
    paths = tuple(str(p.resolve()) for p in local)
    if paths:
        manager = _manager(paths, False, metadata)
        if all(_known(manager, n) for n in names):
            return manager
    manager = _manager(paths, True, metadata)
    for name in names:
        if not _known(manager, name):
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise InputError(f"unknown lm-eval task {name!r}{hint}", field="--tasks")
    return manager


@functools.lru_cache(maxsize=4)
def _manager(paths: tuple[str, ...], defaults: bool, metadata: tuple[tuple[str, str], ...]) -> Any:
    """One index per set of folders for the process (tests and notebooks ask again)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(
        include_path=list(paths) or None, include_defaults=defaults, metadata=dict(metadata) or None
    )


def _known(manager: Any, name: str) -> bool:
    return name in manager.all_tasks or (name.endswith(".yaml") and Path(name).is_file())


def load_tasks(manager: Any, names: Sequence[str]) -> dict[str, Any]:
    """``TaskManager.load`` name by name (each builds its dataset), so that a dataset that
    cannot be loaded is reported with the task that needs it."""
    tasks: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    group_map: dict[str, list[str]] = {}
    for name in names:
        try:
            loaded = manager.load([name])
        except InputError:
            raise
        except Exception as exc:  # lm-eval and datasets raise many kinds
            raise _load_error(name, exc) from None
        tasks.update(loaded["tasks"])
        groups.update(loaded.get("groups", {}))
        group_map.update(loaded.get("group_map", {}))
    return {"tasks": tasks, "groups": groups, "group_map": group_map}


def _load_error(task: str, exc: BaseException) -> InputError:
    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    inner = next((e for e in chain if isinstance(e, InputError)), None)
    if inner is not None:
        return inner
    text = " ".join(str(exc).split())[:300]
    if any(_offline(e) for e in chain):
        return InputError(
            f"its dataset could not be loaded offline (no network access to the Hugging Face "
            f"Hub and no local copy): {text}; use a task whose data is local (--include-path)",
            field=f"--tasks {task}",
        )
    return InputError(f"could not be loaded: {type(exc).__name__}: {text}", field=f"--tasks {task}")


def _offline(exc: BaseException) -> bool:
    """A failure to reach the Hub (no network, HF_HUB_OFFLINE, not in the local cache)."""
    names = {t.__name__ for t in type(exc).__mro__}
    wanted = {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError",
              "DatasetNotFoundError"}  # fmt: skip
    return bool(names & wanted) or "couldn't reach" in str(exc).lower()


def _apply_overrides(tasks: dict[str, Any], num_fewshot: int | None, fewshot_seed: int) -> None:
    """What ``simple_evaluate`` does to each task: ``num_fewshot`` replaces a task's own
    number unless the task fixes it at 0; a task without one gets 0."""
    for task in tasks.values():
        own = task.get_config("num_fewshot")
        if num_fewshot is not None and own != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif own is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=fewshot_seed)


def _refuse_unsupported(tasks: dict[str, Any]) -> None:
    """What lm-eval would refuse only after the model is loaded."""
    for name, task in tasks.items():
        if getattr(task, "UNSAFE_CODE", False):
            raise InputError(
                "the task runs model-written code; selfalign does not run such tasks",
                field=f"--tasks {name}",
            )
        if getattr(task, "MULTIMODAL", False):
            raise InputError("a multimodal task; our backends take text", field=f"--tasks {name}")


class _QuietCustomDataset(logging.Filter):
    """lm-eval warns on every task with its own loader; ours take no user kwargs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def run_lm_eval(
    open_backend: Callable[[], AbstractContextManager[Backend]],
    *,
    model: str,
    model_id: str,
    tasks: Sequence[str],
    include_paths: Sequence[Path] = (),
    truthfulqa_data: Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    seed: int | None = None,
    records: Path | None = None,
    apply_chat_template: bool = False,
    chunk_size: int = 128,
) -> EvalResult:
    """Run ``tasks`` on the backend ``open_backend()`` gives; the result in our format, with
    lm-eval's own numbers (``results``, ``n-samples``, versions) under ``details``."""
    lm_eval_version = require_lm_eval()
    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate
    from lm_eval.utils import handle_non_serializable

    from selfalign.eval.harness import BackendLM

    if truthfulqa_data is not None:
        from selfalign.eval.truthfulqa import load_truthfulqa

        load_truthfulqa(truthfulqa_data)  # bad data fails before anything loads
    task_log = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _QuietCustomDataset) for f in task_log.filters):
        task_log.addFilter(_QuietCustomDataset())
    names = list(dict.fromkeys(tasks))
    manager = task_manager(names, include_paths, truthfulqa_data)
    seeds = DEFAULT_SEEDS if seed is None else (seed,) * 4
    loaded = load_tasks(manager, names)
    _refuse_unsupported(loaded["tasks"])
    _apply_overrides(loaded["tasks"], num_fewshot, seeds[3])
    random.seed(seeds[0])
    np.random.seed(seeds[1])
    torch.manual_seed(seeds[2])
    with open_backend() as backend:
        lm = BackendLM(
            backend, model_id=model_id, records=records, seed=seeds[0], chunk_size=chunk_size
        )
        out = evaluate(
            lm=lm, task_dict=loaded, limit=limit, log_samples=False,
            apply_chat_template=apply_chat_template, fewshot_as_multiturn=apply_chat_template,
        )  # fmt: skip
    keep = ("results", "groups", "group_subtasks", "n-samples", "n-shot", "versions",
            "higher_is_better")  # fmt: skip
    raw = json.loads(
        json.dumps({k: out.get(k) for k in keep}, default=handle_non_serializable)
    )  # numpy numbers -> plain JSON
    details = {
        "tasks": names,
        **raw,
        "lm_eval_version": lm_eval_version,
        "backend": backend.name,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "seeds": dict(zip(("python", "numpy", "torch", "fewshot"), seeds, strict=True)),
        "apply_chat_template": apply_chat_template,
        "is_greedy": _greedy_note(lm, backend.name),
        "requests": {"computed": dict(lm.computed), "reused": dict(lm.reused)},
        "records": str(records) if records is not None else None,
    }
    data = [data_ref(truthfulqa_data)] if truthfulqa_data is not None else []
    return EvalResult("lm-eval", "lm-eval", model, data, metrics_of(raw), details)


def _greedy_note(lm: Any, backend: str) -> str | None:
    """How lm-eval's ``is_greedy`` was filled (None: no loglikelihood request ran)."""
    if not (lm.computed["loglikelihood"] or lm.reused["loglikelihood"]):
        return None
    return "exact" if lm.greedy_known else f"not reported by the {backend} backend (False)"


def metrics_of(raw: dict[str, Any]) -> list[Metric]:
    """``TASK/METRIC`` (``/FILTER`` unless lm-eval's "none") for every number lm-eval
    reports, standard errors aside (they stay in ``details.results``)."""
    n_samples = raw.get("n-samples") or {}
    subtasks = raw.get("group_subtasks") or {}

    def n_of(task: str) -> int:
        if task in n_samples:
            return int(n_samples[task].get("effective", 0))
        return sum(n_of(t) for t in subtasks.get(task, []))

    metrics = []
    for task, values in (raw.get("results") or {}).items():
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or isinstance(value, bool):
                continue
            if not isinstance(value, int | float):
                continue
            name = f"{task}/{metric}" + ("" if filt == "none" else f"/{filt}")
            metrics.append(Metric(name, float(value), n_of(task)))
    return metrics
