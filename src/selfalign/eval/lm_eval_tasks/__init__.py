"""lm-evaluation-harness task files that read local data (no Hub access needed).

``truthfulqa_mc1`` / ``truthfulqa_mc2`` here are lm-eval's tasks of those names (same
prompt, same choices, same metrics; checked equal to ``selfalign eval truthfulqa
--protocol lm-eval``) reading TruthfulQA from a local file: ``mc_task.json`` or HF
``truthful_qa``/``multiple_choice`` rows, whatever ``load_truthfulqa`` reads. The file
comes in as the task metadata ``truthfulqa_data`` (``selfalign eval lm-eval
--truthfulqa-data FILE``). The YAML files name the functions below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfalign.errors import InputError
from selfalign.eval.truthfulqa import lm_eval_context, load_truthfulqa, mc2_mass

TASKS_DIR = Path(__file__).parent
DATA_KEY = "truthfulqa_data"  # the task metadata naming the data file


def truthfulqa_dataset(**metadata: Any) -> Any:
    """The questions as a ``datasets.DatasetDict`` with a ``validation`` split, in the
    layout of HF ``truthful_qa``/``multiple_choice``."""
    import datasets

    path = metadata.get(DATA_KEY)
    if not path:
        raise InputError(
            "the local TruthfulQA tasks need the data file (mc_task.json)",
            field="--truthfulqa-data",
        )
    rows = [
        {
            "question": q.question,
            "mc1_targets": {"choices": list(q.mc1_choices), "labels": list(q.mc1_labels)},
            "mc2_targets": {"choices": list(q.mc2_choices), "labels": list(q.mc2_labels)},
        }
        for q in load_truthfulqa(Path(path))
    ]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


def prompt(doc: dict[str, Any]) -> str:
    """The QA primer, then the question (``lm_eval_context``)."""
    return lm_eval_context(doc["question"])


def mc1_gold(doc: dict[str, Any]) -> int:
    return doc["mc1_targets"]["labels"].index(1)


def mc2_results(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    """Probability mass on the true MC2 choices (``mc2_mass``: lm-eval's normalised
    ``exp``, computed with a log-sum-exp)."""
    return {"acc": mc2_mass([ll for ll, _ in results], doc["mc2_targets"]["labels"])}
