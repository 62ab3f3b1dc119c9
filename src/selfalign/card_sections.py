"""Markdown sections of the cards: tables and lists of what a run recorded.

Each section takes the ``RunView`` and shows what is there, looked up defensively: a stat
another part of selfalign adds later (end-of-turn check, cost, environment) shows up
when present and is left out when not.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from selfalign.environment import flatten
from selfalign.errors import InputError
from selfalign.model_origin import ModelOrigin
from selfalign.registry import load_stage, stage_names
from selfalign.run_view import ModelFolder, RunView
from selfalign.stages.api import RECORDS
from selfalign.store import read_records

_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)


def table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fence(text: str, lang: str = "") -> str:
    ticks = "`" * max(3, max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}"


def _value(v: Any) -> str:
    if isinstance(v, dict | list):
        text = json.dumps(v, ensure_ascii=False)
        return f"`{text[:300]}{'...' if len(text) > 300 else ''}`"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def items(data: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    return "\n".join(f"- {k}: {_value(v)}" for k, v in data.items() if k not in skip and v != {})


def stages_section(run: RunView, names: list[str]) -> str:
    rows = []
    for n in names:
        e = run.stages.get(n, {})
        c = e.get("counts", {})
        reasons = [f"{r} {k}" for r, k in (e.get("drop_reasons") or {}).items()]
        reasons = ", ".join(reasons[:3]) + (
            f", {len(reasons) - 3} more" if len(reasons) > 3 else ""
        )
        seconds = (e.get("timings") or {}).get("seconds")
        rows.append([n, e.get("status"), c.get("in"), c.get("out"), c.get("dropped"),
                     reasons or "-", seconds])  # fmt: skip
    return table(["stage", "status", "in", "out", "dropped", "drop reasons", "seconds"], rows)


def annotations_section(run: RunView, names: list[str]) -> str:
    """The human-written files the stages read, with their line counts."""
    from selfalign.annotations.count import count_file
    from selfalign.validation import validate_model

    rows, total = [], 0
    for name in names:
        stage = load_stage(name) if name in stage_names() else None
        if stage is None or stage.annotation_files is None:
            continue
        config_file = run.run_dir / "config.yaml"
        try:
            cfg = validate_model(stage.config_cls, run.stage_config(name), file=config_file)
            files = stage.annotation_files(cfg)
        except InputError as e:
            rows.append([name, f"(could not read: {e})", "-", "-"])
            continue
        for path in files:
            try:
                counted = count_file(Path(path))
            except InputError:
                rows.append([name, str(path), "missing", "-"])
                continue
            total += counted.lines
            rows.append([name, str(path), counted.kind, counted.lines])
    if not rows:
        return "These stages read no annotation files."
    return table(["stage", "file", "kind", "human-written lines"], rows) + f"\n\nTotal: {total}"


def eval_rows(run: RunView) -> list[dict[str, Any]]:
    return read_records(run.run_dir / "eval" / RECORDS) if run.complete("eval") else []


def eval_section(run: RunView, model: str) -> str | None:
    """This model's eval numbers beside the base model's, if the eval stage ran."""
    columns = ["base", "base_icl", model]
    scores: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in eval_rows(run):
        if row.get("model") not in columns:
            continue
        column = row["model"]
        for m in row.get("metrics", []):
            key = (row.get("benchmark", "?"), row.get("protocol", "?"), m["metric"])
            scores.setdefault(key, {})[column] = m["value"]
            scores[key]["n"] = m.get("n")
    if not any(model in v for v in scores.values()):
        return None
    used = [c for c in columns if any(c in v for v in scores.values())]
    rows = [[*k, *(v.get(c) for c in used), v.get("n")] for k, v in scores.items()]
    head = ["benchmark", "protocol", "metric", *[f"{c} (this model)" if c == model else c
                                               for c in used], "n"]  # fmt: skip
    note = ("base_icl: the base model prompted with stage 2's principles and exemplars. "
            if "base_icl" in used else "")  # fmt: skip
    return table(head, rows) + f"\n\n{note}n: items scored. Results: `eval/` of the run."


def hub_eval_results(run: RunView, model: str) -> list[Any]:
    """TruthfulQA and HHH numbers as Hub ``model-index`` entries (the Hub groups them by
    dataset, so the protocol goes in each metric's name)."""
    from huggingface_hub import EvalResult

    datasets = {"truthfulqa": ("truthfulqa/truthful_qa", "TruthfulQA", "multiple_choice"),
                "hhh": ("HuggingFaceH4/hhh_alignment", "HHH alignment", None)}  # fmt: skip
    out = []
    for row in eval_rows(run):
        if row.get("model") != model or row.get("benchmark") not in datasets:
            continue
        dataset_type, dataset_name, config = datasets[row["benchmark"]]
        for m in row.get("metrics", []):
            out.append(EvalResult(
                task_type="multiple-choice", dataset_type=dataset_type,
                dataset_name=f"{dataset_name} (n={m.get('n')})", dataset_config=config,
                metric_type=m["metric"], metric_value=m["value"],
                metric_name=f"{m['metric']} ({row.get('protocol')} protocol)",
            ))  # fmt: skip
    return out


def checks_section(stats: dict[str, Any]) -> str | None:
    """The after-training checks another stage records: end of turn, template round trip."""
    parts = []
    turn = stats.get("turn_end")
    if isinstance(turn, dict) and turn:
        parts.append("End of turn on held-out prompts (greedy, through the saved chat template, "
                     "no stop strings):\n\n" + items(turn))  # fmt: skip
    check = stats.get("template_check")
    if isinstance(check, dict) and check:
        parts.append("Chat template round trip over the training examples:\n\n" + items(check))
    return "\n\n".join(parts) or None


def cost_section(run: RunView, names: list[str]) -> str | None:
    costs = {n: run.stages.get(n, {}).get("cost") for n in names}
    costs = {n: c for n, c in costs.items() if isinstance(c, dict) and c}
    keys = list(dict.fromkeys(k for c in costs.values() for k, v in c.items() if v is not None))
    if not keys:
        return None
    return table(["stage", *keys], [[n, *(c.get(k) for k in keys)] for n, c in costs.items()])


def environment_section(run: RunView, stage: str) -> str | None:
    """What the stage ran on: the record its manifest entry names, else the run's latest."""
    key = run.stages.get(stage, {}).get("environment")
    record = (run.manifest.get("environments") or {}).get(key) if isinstance(key, str) else None
    record = record or run.manifest.get("environment")
    if not isinstance(record, dict) or not record:
        return None
    lines = []
    for name, value in record.items():
        if isinstance(value, dict) and value:
            flat = flatten(value)
            value = ", ".join(f"{k} {_value(v)}" for k, v in flat.items())
        lines.append(f"- {name}: {_value(value) if value != {} else '-'}")
    return "\n".join(lines)


def license_note(base: ModelOrigin) -> str:
    lic = base.license
    if lic.id == "other":
        return ("The base model's folder does not state its license: check the base model's "
                "license before you use or share this.")  # fmt: skip
    link = f" ({lic.link})" if lic.link else ""
    return f"License: `{lic.id}`{link}, that of the base model (read from its {lic.source})."


def config_section(run: RunView) -> str:
    text = yaml.safe_dump(run.config, sort_keys=False, allow_unicode=True)
    return f"<details><summary>config.yaml</summary>\n\n{fence(text, 'yaml')}\n\n</details>"


def redact(text: str) -> str:
    """Drop the values of secret-looking environment variables (and of any variable a
    config names as ``api_key_env``) from ``text``."""
    names = {n for n in os.environ if _SECRET_NAME.search(n)}
    names |= set(re.findall(r"api_key_env:\s*([A-Za-z_][A-Za-z0-9_]*)", text))
    for name in names:
        value = os.environ.get(name, "")
        if len(value) >= 8:
            text = text.replace(value, "[redacted]")
    return text


def usage_section(folder: ModelFolder, where: str, base: str, name: str) -> str:
    chat = f"selfalign chat {where}"
    if folder.kind == "mote":
        load = f'from selfalign.mote import load_mote\n\nmodel, tokenizer = load_mote("{where}")'
        serve = ("MoTE routes tokens to experts by reasoning step, which `vllm serve` does not "
                 "do: chat with `selfalign chat`, or export one step's merged weights "
                 "(`selfalign.mote.export_merged_step`) for any Hugging Face stack.")  # fmt: skip
    else:
        cls = "AutoPeftModelForCausalLM" if folder.kind == "adapter" else "AutoModelForCausalLM"
        module = "peft" if folder.kind == "adapter" else "transformers"
        load = (f"from {module} import {cls}\nfrom transformers import AutoTokenizer\n\n"
                f'model = {cls}.from_pretrained("{where}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{where}")\n'
                'messages = [{"role": "user", "content": "How do I boil an egg?"}]\n'
                "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,\n"
                '                                       return_tensors="pt", return_dict=True)\n'
                "out = model.generate(**inputs, max_new_tokens=256)\n"
                'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], '
                "skip_special_tokens=True))")  # fmt: skip
        if folder.kind == "adapter":
            serve = fence(f"vllm serve {base} --enable-lora --lora-modules {name}={where} \\\n"
                           f"    --chat-template {where}/chat_template.jinja", "bash")  # fmt: skip
            serve += ("\n\nThe adapter's own chat template must be given: vLLM otherwise uses the "
                      "base model's. peft reads the base model from `adapter_config.json` "
                      f"(`{base}` here).")  # fmt: skip
        else:
            serve = fence(f"vllm serve {where}", "bash") + (
                "\n\nThe chat template is saved with the tokenizer, so the OpenAI-compatible "
                "chat endpoint formats conversations as in training."
            )
    return (f"Load:\n\n{fence(load, 'python')}\n\nChat in a terminal:\n\n"
            f"{fence(chat, 'bash')}\n\nServe:\n\n{serve}")  # fmt: skip
