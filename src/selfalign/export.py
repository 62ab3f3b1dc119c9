"""``selfalign export RUN_DIR OUT``: Hub-ready folders of a run's models and record sets.

::

    OUT/
      datasets/<stage>/                       prompts, aligned, verbose, chains, mote
        data/train-00000-of-00001.parquet     the kept records, plus a ``messages`` column
        dropped/train-00000-of-00001.parquet  the dropped ones with their ``reason``
        README.md                             dataset card; its ``configs`` point at the files
      models/<name>/                          engraved, final, mote
        the model's files as the run wrote them, README.md (model card)

Which folder is exported as a model: for ``engraved`` the merged weights when the run
merged them (``engraved/merged``: plain weights that transformers and ``vllm serve`` load
alone), else the LoRA adapter; ``final`` is ``verbose/model``; ``mote`` is ``mote/model``.
Training leftovers (checkpoints, ``training_args.bin``, the stage's JSONL logs) stay
behind. Files are hard links where the filesystem allows, copies otherwise, so a large
model costs no space twice. When pushing, an adapter's ``adapter_config.json`` names the
base model by its Hub id (found, or ``--base-model``) instead of this machine's path, so
peft loads it from the Hub; a local export keeps the path, so it loads offline.

OUT is written beside itself under a temporary name and renamed at the end: a failed
export leaves nothing. ``push`` uploads each folder with ``huggingface_hub`` (models to
``ORG/NAME-<model>``, datasets to ``ORG/NAME-<stage>``); the token comes from ``HF_TOKEN``
only.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfalign.cards import CARD, dataset_card, model_card
from selfalign.errors import InputError
from selfalign.model_origin import is_hub_id
from selfalign.run_view import (
    EVAL_NAMES,
    ModelFolder,
    RunView,
    load_run,
    model_folders,
    record_sets,
)
from selfalign.stages.api import DROPPED, RECORDS
from selfalign.stages.prompts import prompt_text
from selfalign.stages.training import trained_system_text
from selfalign.store import atomic_write_text, folder_in_place, read_records

SHARD = "train-00000-of-00001.parquet"
# the stage whose training read each record set (its system text goes in ``messages``)
TRAINED_BY = {"aligned": "engraved", "verbose": "verbose", "chains": "mote", "mote": "mote",
              "preferences": "dpo"}  # fmt: skip
# the record set each model was trained on
TRAINED_ON = {"engraved": "aligned", "verbose": "verbose", "mote": "chains", "dpo": "preferences"}
_LEFT_BEHIND = ("checkpoints", "launch", "training_args.bin", CARD, "merged", "*.jsonl", ".*")


@dataclass
class ExportResult:
    out: Path
    datasets: dict[str, int] = field(default_factory=dict)  # stage -> records
    models: dict[str, Path] = field(default_factory=dict)  # name -> the run's folder
    pushed: list[str] = field(default_factory=list)  # repository URLs


def export_run(
    run_dir: Path,
    out: Path,
    *,
    push: str | None = None,
    private: bool = False,
    base_model: str | None = None,
) -> ExportResult:
    run_dir, out = Path(run_dir), Path(out)
    if base_model is not None and not is_hub_id(base_model):
        raise InputError("must be a Hub model id (ORG/NAME)", field="--base-model")
    run = load_run(run_dir, base_hub_id=base_model)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError("exists and is not empty", file=out)
    models = exported_models(run)
    sets = [s for s in record_sets(run) if (run.run_dir / s / RECORDS).stat().st_size]
    if not models and not sets:
        raise InputError(
            "nothing to export: no complete stage with records or a model", file=run_dir
        )
    token = _push_checks(run, push, [*sets, *models]) if push else None

    result = ExportResult(out)
    with folder_in_place(out) as tmp:
        for stage in sets:
            where = f"{push}-{stage}" if push else str(out / "datasets" / stage)
            result.datasets[stage] = export_records(run, stage, tmp / "datasets" / stage, where)
        for name, folder in models.items():
            trained_on = TRAINED_ON.get(folder.stage)
            datasets = [f"{push}-{trained_on}"] if push and trained_on in sets else None
            where = f"{push}-{name}" if push else str(out / "models" / name)
            export_model(run, folder, tmp / "models" / name, where, datasets, hub=bool(push))
            result.models[name] = folder.path
    if push:
        result.pushed = push_folders(out, push, private=private, token=token)
    return result


def exported_models(run: RunView) -> dict[str, ModelFolder]:
    """One folder per model: merged weights over the adapter they came from."""
    chosen: dict[str, ModelFolder] = {}
    for folder in model_folders(run):
        if folder.variant == "adapter" or folder.row:
            continue  # verbose/adapter: the final model is its merge; rows: ablations
        name = EVAL_NAMES.get(folder.stage, folder.stage)
        if name not in chosen or folder.variant == "merged":
            chosen[name] = folder
    return chosen


def _push_checks(run: RunView, repo: str, names: list[str]) -> str:
    """Everything a push needs, checked before anything is written or sent."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if "/" not in repo:
        raise InputError("must be ORG/NAME", field="--push")
    for name in names:
        try:
            validate_repo_id(f"{repo}-{name}")
        except HFValidationError as e:
            raise InputError(f"{repo}-{name}: {e}", field="--push") from None
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise InputError("needs a Hub token with write access in $HF_TOKEN", field="--push")
    if run.base.hub_id is None:
        raise InputError(
            f"the base model is a local folder ({run.base.ref}) with no Hub id, which the "
            "Hub's base_model field needs: give it with --base-model ORG/NAME",
            field="--base-model",
        )
    return token


# -- record sets ------------------------------------------------------------------------------
def system_text(run: RunView, stage: str) -> str | None:
    """The system text the model trained on ``stage``'s records saw (None: no system turn)."""
    trainer = TRAINED_BY.get(stage)
    if trainer is None:
        return None
    artifact = run.stages.get(trainer, {}).get("artifact")
    return trained_system_text(run.run_dir / artifact) if artifact else None


def messages(record: dict[str, Any], system: str | None) -> list[dict[str, str]]:
    """A record as a chat: (system,) user, assistant; a prompt record is one user turn."""
    user = record.get("prompt") or record.get("question")
    if not user and record.get("instruction"):
        user = prompt_text(record)
    if not isinstance(user, str) or not user:
        return []
    answer = record.get("answer")
    turns = [{"role": "system", "content": system}] if system else []
    if "chosen" in record:  # a preference pair: the prompt side, as DPO saw it
        return [*turns, {"role": "user", "content": user}]
    if not isinstance(answer, str):
        return [{"role": "user", "content": user}]
    return [*turns, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def table_columns(rows: list[dict[str, Any]]) -> tuple[dict[str, list[Any]], list[str]]:
    """Column lists over every field any row has; a field that Arrow cannot hold as one
    type (mixed types across records) becomes JSON text. Returns (columns, JSON fields)."""
    import pyarrow as pa

    keys = dict.fromkeys(k for r in rows for k in r)
    columns = {k: [r.get(k) for r in rows] for k in keys}
    as_json = []
    for key, values in columns.items():
        try:
            ok = _parquet_ok(pa.array(values).type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            ok = False
        if not ok:
            columns[key] = [
                None if v is None else json.dumps(v, ensure_ascii=False) for v in values
            ]
            as_json.append(key)
    return columns, as_json


def _parquet_ok(t: Any) -> bool:
    """Parquet stores no struct without fields (an empty dict in every record)."""
    import pyarrow as pa

    if pa.types.is_struct(t):
        return t.num_fields > 0 and all(_parquet_ok(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _parquet_ok(t.value_type)
    return True


def write_parquet(rows: list[dict[str, Any]], path: Path) -> list[str]:
    import datasets

    columns, as_json = table_columns(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # one bar per file says nothing here
    try:
        datasets.Dataset.from_dict(columns).to_parquet(str(path))
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    return as_json


def export_records(run: RunView, stage: str, folder: Path, where: str) -> int:
    """``folder``: the kept records (and the dropped ones) as parquet, plus the card."""
    system = system_text(run, stage)
    files, as_json = {}, set()
    for config, name in (("default", RECORDS), ("dropped", DROPPED)):
        records = read_records(run.run_dir / stage / name)
        if not records:
            continue
        rows = [{"id": r.get("id"), "messages": messages(r, system), **r} for r in records]
        rel = f"{'data' if config == 'default' else config}/{SHARD}"
        as_json.update(write_parquet(rows, folder / rel))
        files[config] = rel
    note = _columns_note(stage, system, sorted(as_json))
    card = dataset_card(run, stage, data_files=files, where=where, columns_note=note)
    atomic_write_text(folder / CARD, card)
    return len(read_records(run.run_dir / stage / RECORDS))


def _columns_note(stage: str, system: str | None, as_json: list[str]) -> str:
    if stage == "prompts":
        text = "`messages` holds each prompt as a single user turn (instruction, then input)."
    elif stage == "preferences":
        text = ("`prompt`, `chosen` and `rejected` are the pair as text, the columns trl's "
                "`DPOTrainer` reads; `messages` holds the prompt side as a conversation "
                "(system text, user turn), as the DPO model saw it.")  # fmt: skip
        if system:
            text += " Its system text:\n\n```\n" + system + "\n```"
    else:
        text = ("`messages` holds each record as a conversation (system text, user turn, "
                "answer), ready for `tokenizer.apply_chat_template` or trl's `SFTTrainer`.")  # fmt: skip
        if system:
            text += " The system text is the one the model trained on these records saw:\n\n"
            text += "```\n" + system + "\n```"
    text += (
        f"\n\nThe other columns are the fields of `{stage}/records.jsonl` as the run wrote them."
    )
    if as_json:
        fields = ", ".join(f"`{f}`" for f in as_json)
        text += f" Stored as JSON text, because their type varies between records: {fields}."
    return "## Columns\n\n" + text


# -- models -----------------------------------------------------------------------------------
def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def export_model(
    run: RunView,
    folder: ModelFolder,
    dest: Path,
    where: str,
    datasets: list[str] | None,
    *,
    hub: bool = False,
) -> None:
    """Copy (link) the model's files into ``dest`` with its card. ``hub``: bound for the
    Hub, so an adapter names its base model by Hub id, not by this machine's path."""
    shutil.copytree(folder.path, dest, ignore=shutil.ignore_patterns(*_LEFT_BEHIND),
                    copy_function=_link_or_copy)  # fmt: skip
    config_file = dest / "adapter_config.json"
    if hub and folder.kind == "adapter" and run.base.hub_id and config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = run.base.hub_id
        config_file.unlink()  # a hard link: the run's own file stays as it was
        atomic_write_text(config_file, json.dumps(config, indent=2) + "\n")
    card = model_card(run, folder, where=where, base_model=run.base.hub_id, datasets=datasets)
    atomic_write_text(dest / CARD, card)


def push_folders(out: Path, repo: str, *, private: bool, token: str | None) -> list[str]:
    """Upload every exported folder to its own Hub repository."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    urls = []
    for kind, repo_type in (("datasets", "dataset"), ("models", "model")):
        for folder in sorted((out / kind).iterdir()) if (out / kind).is_dir() else []:
            repo_id = f"{repo}-{folder.name}"
            url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
            api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type=repo_type,
                              commit_message="selfalign export")  # fmt: skip
            urls.append(str(url))
    return urls
