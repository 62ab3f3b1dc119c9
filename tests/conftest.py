"""Shared fixtures: the tiny model is built once per test session, like a user would."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Requests the backend tests share: a long common prefix and prompts of varied length.
PREFIX = "You are a careful assistant. Answer briefly and truthfully. " * 12
PROMPTS = [
    "What is the capital of France?",
    "hi",
    "Write a haiku about rain on a tin roof.",
    "List three prime numbers.",
    "Explain recursion to a child in two sentences.",
    "2 + 2 =",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from selfalign.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def pretrained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model pre-trained briefly on our formats (as ``demo --tiny`` makes it), so a
    model trained from it writes answers that end: what stage tests need downstream."""
    from selfalign.pretrain import pretrain_tiny

    path = tmp_path_factory.mktemp("pretrained") / "model"
    pretrain_tiny(path, steps=300, seed=0)
    return path


@pytest.fixture(scope="session")
def mc_task(shared_data: Path) -> Path:
    """TruthfulQA's mc_task.json from ../shared/data (skipped where it is absent)."""
    path = shared_data / "truthfulqa" / "mc_task.json"
    if not path.is_file():
        pytest.skip(f"TruthfulQA data not found at {path}")
    return path


@pytest.fixture(scope="session")
def varied_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a wider init, so that greedy outputs differ between prompts
    and equality checks between backends compare real, non-constant text."""
    from selfalign.tiny import make_tiny_model

    path = tmp_path_factory.mktemp("varied") / "model"
    return make_tiny_model(path, seed=3, initializer_range=0.2)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"evaluation data not found at {SHARED_DATA}")
    return SHARED_DATA


RunAligned = Callable[..., list[dict[str, Any]]]


@pytest.fixture
def run_aligned() -> RunAligned:
    """Runs the real ``aligned`` stage (stage 2) through the runner on any backend block.
    Stage 1 is stood in for by prompt records, marked complete under the fingerprint the
    runner computes. Returns the prompt records."""
    from selfalign.backends import BackendConfig
    from selfalign.config import RunConfig
    from selfalign.pipeline import Manifest, Runner
    from selfalign.stages.aligned import AlignedConfig
    from selfalign.stages.prompts import PromptsConfig
    from selfalign.store import JsonlWriter, record_id

    def run(
        block: BackendConfig, model: Path, run_dir: Path, questions: list[str], **settings: Any
    ) -> list[dict[str, Any]]:
        run = RunConfig(model=str(model), backend=block)
        stages = {"prompts": PromptsConfig(), "aligned": AlignedConfig(**settings)}
        plan = Runner(run, stages, run_dir, run_dir).plan()
        prompts = [
            {"id": record_id("prompt", q), "instruction": q, "input": "", "source": "self_instruct"}
            for q in questions
        ]
        JsonlWriter(run_dir / "prompts" / "records.jsonl").append(prompts)
        fingerprint = next(i.fingerprint for i in plan if i.stage.name == "prompts")
        Manifest(run_dir).update(
            "prompts", status="complete", fingerprint=fingerprint, counts={"out": len(prompts)}
        )
        runner = Runner(run, stages, run_dir, run_dir / "config.yaml")
        runner.execute(runner.plan())
        return prompts

    return run
