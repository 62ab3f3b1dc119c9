"""The built-in stages by module, upstream before downstream.

A stage's module is imported only when a config names the stage or the runner runs it
(the way lm-evaluation-harness maps model names to modules lazily), so looking at a run
(`status`, `run --dry-run`) never imports a stage it does not need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from selfalign.stages.api import Stage

STAGE_MODULES: dict[str, str] = {
    "prompts": "selfalign.stages.prompts",
    "aligned": "selfalign.stages.aligned",
    "engraved": "selfalign.stages.engrave",
    "verbose": "selfalign.stages.verbose",
    "preferences": "selfalign.stages.preferences",
    "dpo": "selfalign.stages.dpo",
    "chains": "selfalign.stages.chains",
    "mote": "selfalign.stages.mote_stage",
    "eval": "selfalign.stages.evaluate",  # last: it scores the models of the others
}


def stage_names() -> list[str]:
    return list(STAGE_MODULES)


def load_stage(name: str) -> Stage:
    """The stage registered under ``name`` (its module's ``STAGE``)."""
    return importlib.import_module(STAGE_MODULES[name]).STAGE
