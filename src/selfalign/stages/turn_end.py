"""The end-of-turn guard run after a training stage: does the model stop by itself?

A base model fine-tuned on a few hundred answers often never learns to end its turn: served
with its own chat template (``vllm serve``, ``apply_chat_template``), it then writes until
the token limit, or starts the next user turn itself. Stages that generate hide this with
stop strings; users do not have them. So after training, the model answers held-out prompts
(never trained on) through its saved chat template with no system message, greedily, with
no stop strings: it has ended its turn when it emits its end-of-turn token (the template's,
which is its EOS) before ``max_new_tokens``. The rate goes in the stage's manifest stats and
the report, with a loud warning below ``min_rate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from selfalign.backends import SamplingParams, parse_spec
from selfalign.chat_format import USER_TAG
from selfalign.stages.api import StageContext
from selfalign.stages.training import trained_backend
from selfalign.validation import StrictModel

TURN_END = "turn_end"  # aux file of the stage: one row, the check's result


class TurnEndCheck(StrictModel):
    prompts: int = Field(8, ge=0, description="held-out prompts answered; 0 turns it off")
    max_new_tokens: int = Field(256, gt=0)
    min_rate: float = Field(0.5, ge=0, le=1, description="warn loudly below this rate")


def pick_prompts(prompts: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """``n`` prompts taking each kind in turn (file order within a kind)."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for p in prompts:
        by_kind.setdefault(p["kind"], []).append(p)
    picked: list[dict[str, Any]] = []
    while len(picked) < n and any(by_kind.values()):
        for queue in by_kind.values():
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return picked


def check_turn_end(ctx: StageContext, model_dir: Path, check: TurnEndCheck) -> dict[str, Any]:
    """Run the guard once per built model (its result is kept in the stage folder)."""
    done = ctx.read_aux(TURN_END)
    if done:
        return done[-1]
    row: dict[str, Any] = {"id": TURN_END, "prompts": check.prompts}
    backend = ctx.run.generation_backend()
    if check.prompts == 0:
        row["skipped"] = "turned off (turn_end.prompts: 0)"
    elif parse_spec(backend.model).kind == "openai":
        row["skipped"] = "the run's backend is a server, which cannot load the trained model"
    else:
        row.update(_answer(ctx, trained_backend(backend, model_dir), check))
    ctx.append_aux(TURN_END, [row])
    if row.get("ok") is False:
        ctx.log(
            f"WARNING: the model ended its turn by itself on only {row['ended']}/{row['prompts']}"
            f" held-out prompts ({row['rate']:.0%} < {check.min_rate:.0%}): served with its "
            "chat template, it will run to the token limit or write the next turn itself"
        )
    return row


def _answer(ctx: StageContext, backend_config: Any, check: TurnEndCheck) -> dict[str, Any]:
    from selfalign.eval.heldout import chat_requests, load_heldout

    prompts = pick_prompts(load_heldout(), check.prompts)
    params = SamplingParams(max_new_tokens=check.max_new_tokens, temperature=0.0)
    requests = chat_requests(prompts, params)
    results = ctx.backend(backend_config, alone=True).generate(requests)
    ctx.close()  # free the model before the stage goes on
    answers = [
        {"id": p["id"], "kind": p["kind"], "ended": r.finish_reason == "stop",
         "next_turn": USER_TAG in r.text, "tokens": r.completion_tokens, "text": r.text[:400]}
        for p, r in zip(prompts, results, strict=True)
    ]  # fmt: skip
    ended = sum(a["ended"] for a in answers)
    rate = ended / len(answers)
    return {
        "prompts": len(answers),
        "max_new_tokens": check.max_new_tokens,
        "ended": ended,
        "rate": rate,
        "next_turn": sum(a["next_turn"] for a in answers),
        "min_rate": check.min_rate,
        "ok": rate >= check.min_rate,
        "answers": answers,
    }


def turn_end_stats(ctx: StageContext) -> dict[str, Any]:
    """The manifest's view of the guard (answers left in the stage folder)."""
    rows = ctx.read_aux(TURN_END)
    if not rows:
        return {}
    return {"turn_end": {k: v for k, v in rows[-1].items() if k not in ("id", "answers")}}
