"""Model cards and dataset cards for what a run writes, built from what the run records.

Every model folder a run builds (``engraved/`` and its ``merged/``, ``verbose/model`` and
the ``verbose/adapter`` it was merged from, ``mote/model``) gets a ``README.md`` model card,
and every record set (``STAGE/records.jsonl``; eval's results excepted) a ``STAGE/README.md``
dataset card. The YAML metadata goes through ``huggingface_hub``'s card classes; the text
comes from the run directory only: ``manifest.json`` (status, counts, drop reasons, stats,
cost), ``config.yaml`` (the resolved config), ``eval/records.jsonl``, the annotation files
the stages read, and the model folders (chat template, training log, the base model's
license). The runner rewrites the cards of every complete stage whenever a stage
completes, so a model card gains its eval numbers once the eval stage has run.

Nothing here loads a model or imports torch. Environment values that look like secrets
are redacted from every card before it is written (configs hold variable names only).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from selfalign import __version__
from selfalign.card_sections import (
    annotations_section,
    checks_section,
    config_section,
    cost_section,
    environment_section,
    eval_section,
    fence,
    hub_eval_results,
    items,
    license_note,
    redact,
    stages_section,
    table,
    usage_section,
)
from selfalign.run_view import (
    ModelFolder,
    RunView,
    chat_template,
    lineage,
    load_run,
    method_of,
    model_folders,
    record_sets,
)
from selfalign.stages.api import DROPPED, RECORDS
from selfalign.stages.training import trained_system_text
from selfalign.store import atomic_write_text

CARD = "README.md"
# what each record set is
DATA_ABOUT = {
    "prompts": "Stage 1 of SELF-ALIGN: prompts the base model wrote itself, by Self-Instruct "
    "from seed tasks and by topic-guided red-teaming from a list of red-team question types.",
    "aligned": "Stage 2 of SELF-ALIGN: the base model's answers to the stage-1 prompts, written "
    "after in-context exemplars that reason about a short list of principles; each record "
    "keeps the internal thoughts and the principles it cited.",
    "verbose": "Stage 4 of SELF-ALIGN (verbose cloning): the engraved model's answers to the "
    "prompts when asked for thorough answers; the final model learns to give them unasked.",
    "chains": "AlignCoT: reasoning chains the base model wrote for seed queries (question "
    "analysis, answer guidance, answer), each as short as the first answer its own safety "
    "check accepted.",
    "mote": "Answers of the MoTE model (AlignCoT + MoTE), decoded step by step.",
    "preferences": "Preference pairs written under the principles with no human label: the "
    "principled stage-2 answer against the base model's answer without the principles "
    "(contrast), and two answers of the engraved model ranked by the model itself under one "
    "principle, in both orders (self-judged).",
}
# what each model folder is: (stage, variant) -> phrase
MODEL_ABOUT = {
    ("engraved", "model"): "the engraved model (SELF-ALIGN stage 3): the base model fine-tuned "
    "on stage 2's answers with the principles and exemplars removed from the prompt",
    ("engraved", "merged"): "the engraved model (SELF-ALIGN stage 3) with its LoRA adapter "
    "merged into the base weights",
    ("verbose", "model"): "the final model (SELF-ALIGN stage 4, verbose cloning): the base "
    "model fine-tuned to give the engraved model's thorough answers from a plain system text",
    ("verbose", "adapter"): "the LoRA adapter that the final model (SELF-ALIGN stage 4) was "
    "merged from",
    ("dpo", "model"): "the DPO model: the engraved model's LoRA adapter trained further by "
    "direct preference optimisation on principle-driven preference pairs (no human labels)",
    ("dpo", "merged"): "the DPO model with its LoRA adapter merged into the base weights",
    ("mote", "model"): "an AlignCoT + MoTE model: the base model with one LoRA expert per "
    "reasoning step and a shared expert, trained on the model's own safety reasoning chains",
}


def _card_text(data: Any, body: str) -> str:
    return redact(f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n")


def model_card(
    run: RunView,
    folder: ModelFolder,
    *,
    where: str | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
) -> str:
    """The card of one model folder. ``where``: how the snippets name it (default: its
    path); ``base_model``: a Hub id for the metadata; ``datasets``: Hub ids it trained on."""
    from huggingface_hub import ModelCardData

    base = base_model or run.base.ref
    names = lineage(run, folder.stage)
    method = method_of(names)
    entry = run.stages.get(folder.stage, {})
    stats = entry.get("stats") or {}
    assistant = run.config.get("assistant_name", "the assistant")
    label = f"{folder.stage}/{folder.variant}" if folder.variant != "model" else folder.stage
    about = MODEL_ABOUT.get((folder.stage, folder.variant), f"the model of stage {folder.stage}")
    if folder.row:
        about = (f"an ablation row of stage {folder.stage}: the base model trained by method "
                 f"`{folder.variant}` on the same data with the same recipe")  # fmt: skip
    where = where or str(folder.path)
    tags = ["selfalign", "alignment", "self-alignment", method.split()[0].lower()]
    tags += ["dpo"] if "dpo" in names else []
    tags += {"adapter": ["lora", "peft"], "mote": ["mote", "mixture-of-experts"]}.get(
        folder.kind, []
    )
    results = hub_eval_results(run, folder.eval_name) if folder.eval_name else []
    data = ModelCardData(
        base_model=base,
        license=run.base.license.id,
        license_link=run.base.license.link,
        library_name={"adapter": "peft", "full": "transformers"}.get(folder.kind),
        pipeline_tag="text-generation",
        tags=tags,
        datasets=datasets or None,
        model_name=f"{assistant} ({label})" if results else None,
        eval_results=results or None,
    )
    trained = trained_system_text(folder.path)
    fmt = {"adapter": "a LoRA adapter (peft) on the base model",
           "full": "full weights (loads with transformers alone)",
           "mote": "the base model's weights plus MoTE expert weights (selfalign format)"}  # fmt: skip
    local = (
        f" (local folder `{run.base.path}`)" if run.base.path and base != str(run.base.path) else ""
    )
    facts = [
        f"- Base model: `{base}`{local}",
        f"- {license_note(run.base)}",
        f"- Method: {method}; stages: {' -> '.join(names)}",
        f"- Format: {fmt[folder.kind]}",
        f"- Assistant name: {assistant}; seed {run.config.get('seed')}",
        f"- Made with selfalign {__version__}",
    ]
    sections = [
        f"# {assistant} ({label})",
        f"This is {about}. selfalign made it from `{base}` with no human-written answers: "
        "the model wrote its own training data under a few human-written principles and "
        "examples (listed below).",
        "\n".join(facts),
        "## How it was made\n\n" + stages_section(run, names),
    ]
    if stats:
        scalars = {k: v for k, v in stats.items() if k not in ("turn_end", "template_check")}
        sections.append(f"Statistics of stage {folder.stage}:\n\n" + items(scalars))
    if trained:
        sections.append("Trained with this system text:\n\n" + fence(trained))
    if checks := checks_section(stats):
        sections.append("## Checks after training\n\n" + checks)
    if folder.eval_name and (scores := eval_section(run, folder.eval_name)):
        sections.append("## Evaluation\n\n" + scores)
    elif folder.eval_name:
        sections.append("## Evaluation\n\nThe run's eval stage has not scored this model.")
    sections.append("## Human-written inputs\n\n" + annotations_section(run, names))
    template = chat_template(folder.path)
    sections.append("## Chat template\n\n" + (fence(template, "jinja") if template else
                                             "The tokenizer has no chat template."))  # fmt: skip
    sections.append("## Use\n\n" + usage_section(folder, where, base, folder.stage))
    if cost := cost_section(run, names):
        sections.append("## Cost\n\n" + cost)
    if env := environment_section(run, folder.stage):
        sections.append("## Environment\n\n" + env)
    sections.append("## Configuration\n\nThe run's resolved config:\n\n" + config_section(run))
    return _card_text(data, "\n\n".join(sections))


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M")):  # fmt: skip
        if n < limit:
            return label
    return "1M<n<10M"


def _lines(path: Path) -> int:
    """Committed records of a JSONL file (whole lines)."""
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _fields(path: Path, limit: int = 200) -> list[str]:
    """The record fields, in first-seen order, from the first ``limit`` lines."""
    fields: dict[str, None] = {}
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= limit:
                    break
                try:
                    fields.update(dict.fromkeys(json.loads(line)))
                except ValueError:
                    break  # a torn last line
    return list(fields)


def dataset_card(
    run: RunView,
    stage: str,
    *,
    data_files: dict[str, str] | None = None,
    where: str | None = None,
    columns_note: str = "",
) -> str:
    """The card of one record set. ``data_files``: config name -> file (default: the run's
    JSONL files); ``columns_note``: what an export adds (e.g. the ``messages`` column)."""
    from huggingface_hub import DatasetCardData

    folder = run.run_dir / stage
    if data_files is None:  # (not dropped.jsonl: its fields' types vary by drop reason)
        data_files = {"default": RECORDS}
        columns_note = columns_note or (
            "`selfalign export` writes these records as parquet with a `messages` column, "
            "which loads whatever the fields hold; the JSON loader needs one type per field."
        )
    where = where or str(folder)
    names = lineage(run, stage)
    method = method_of(names)
    entry = run.stages.get(stage, {})
    kept, dropped = _lines(folder / RECORDS), _lines(folder / DROPPED)
    configs = [{"config_name": n, "data_files": [{"split": "train", "path": f}]}
               for n, f in data_files.items()]  # fmt: skip
    data = DatasetCardData(
        license=run.base.license.id,
        language=["en"],
        task_categories=["text-generation"],
        size_categories=[_size_category(kept)],
        pretty_name=f"selfalign {stage} records",
        tags=["selfalign", "synthetic", method.split()[0].lower(), stage],
        configs=configs,
    )
    fields = _fields(folder / RECORDS)
    loading = (f'from datasets import load_dataset\n\nrecords = load_dataset("{where}", '
               'split="train")')  # fmt: skip
    if "dropped" in data_files:
        loading += f'\ndropped = load_dataset("{where}", "dropped", split="train")'
    dropped_note = (" (config `dropped`, each with its `reason`)" if "dropped" in data_files
                    else f" ({DROPPED}, each with its `reason`)" if dropped else "")  # fmt: skip
    facts = [
        f"- Source model: `{run.base.ref}`; stages: {' -> '.join(names)}",
        f"- Records: {kept} kept, {dropped} dropped{dropped_note}",
        f"- Fields: {', '.join(f'`{f}`' for f in fields) or '(none)'}",
        "- The records were written by the base model or by models trained from it, whose "
        f"license (`{run.base.license.id}`) may govern how their outputs are used. "
        + license_note(run.base),
    ]
    sections = [
        f"# {stage} records",
        DATA_ABOUT.get(stage, f"The records of stage {stage}.")
        + f" Made from `{run.base.ref}` with selfalign {__version__} ({method}).",
        "\n".join(facts),
    ]
    if columns_note:
        sections.append(columns_note)
    sections.append("## Load\n\n" + fence(loading, "python"))
    sections.append("## How it was made\n\n" + stages_section(run, names))
    if reasons := entry.get("drop_reasons"):
        sections.append("Drop reasons of this stage:\n\n" + table(
            ["reason", "records"], [[r, n] for r, n in reasons.items()]))  # fmt: skip
    if stats := entry.get("stats"):
        sections.append(f"Statistics of stage {stage}:\n\n" + items(stats))
    sections.append("## Human-written inputs\n\n" + annotations_section(run, names))
    if cost := cost_section(run, names):
        sections.append("## Cost\n\n" + cost)
    if env := environment_section(run, stage):
        sections.append("## Environment\n\n" + env)
    stage_config = yaml.safe_dump({stage: run.stage_config(stage)}, sort_keys=False)
    sections.append(f"## Configuration\n\nThe settings of stage {stage}:\n\n"
                    + fence(stage_config, "yaml") + "\n\nThe whole run's:\n\n"
                    + config_section(run))  # fmt: skip
    return _card_text(data, "\n\n".join(sections))


def write_cards(run_dir: Path, manifest: dict[str, Any]) -> list[Path]:
    """(Re)write the card of every model folder and record set of the run's complete
    stages. A card that cannot be built is reported on stderr; the run goes on."""
    try:
        run = load_run(run_dir, manifest)
        return _write_cards(run)
    except Exception as e:  # cards are documentation: never fail a finished stage
        print(f"[cards] could not write the cards: {type(e).__name__}: {e}", file=sys.stderr)
        return []


def _write_cards(run: RunView) -> list[Path]:
    folders = model_folders(run)
    jobs = [(f.path / CARD, lambda f=f: model_card(run, f)) for f in folders]
    models = {f.path for f in folders}
    jobs += [(run.run_dir / s / CARD, lambda s=s: dataset_card(run, s))
             for s in record_sets(run) if run.run_dir / s not in models]  # fmt: skip
    written = []
    for path, build in jobs:
        try:
            atomic_write_text(path, build())
        except Exception as e:  # one bad card does not stop the others
            print(f"[cards] could not write {path}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        written.append(path)
    return written
