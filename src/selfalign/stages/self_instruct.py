"""The Self-Instruct bootstrap loop (stage 1, first generator).

Each round: for every request, sample ``num_examples`` tasks (from the human seeds by
default; ``example_source``), show them as a numbered list whose tasks each end with a
``###`` line (``selfalign.text.parsing``), let the model continue the list; parse the
continuations, filter the items (structure, completeness, length, start, blacklist), then
the ROUGE-L near-duplicate filter against the whole pool (seeds and every kept task), in
request and item order. Kept items join the pool.

Resume: the round is the unit (a ``Round``). After the runner has committed a round's
batch it marks the round in ``rounds.jsonl``; on start the pool is rebuilt from the kept
records of marked rounds, and the first unmarked round is generated again (same seeds,
same pool, hence the same outputs; the runner skips ids already written).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from selfalign.annotations.loaders import SeedTask
from selfalign.backends import GenerationRequest, GenerationResult, SamplingParams
from selfalign.stages.api import Batch, Estimate, Round, StageContext
from selfalign.store import record_id
from selfalign.text.parsing import (
    DEFAULT_BLACKLIST,
    ItemFilter,
    list_prompt,
    parse_continuation,
)
from selfalign.text.rouge import NearDuplicateFilter
from selfalign.validation import ExistingPath, StrictModel

SOURCE = "self_instruct"

HEADER = (
    "A numbered list of tasks that people gave to a capable AI assistant. The tasks are as "
    "varied as possible (writing, editing, coding, math, advice, planning, sorting things "
    "into categories, pulling facts out of a text, explaining, brainstorming) and each one "
    "can be done by replying in text alone. A task that needs material to work on gives it "
    "after Input: (it may run over several lines), and a ### line closes every task.\n"
)


class SelfInstructConfig(StrictModel):
    """Paper values as defaults (METHOD.md, stage 1)."""

    enabled: bool = True
    seed_tasks: ExistingPath | None = Field(None, description="default: the shipped seeds")
    num_prompts: int = Field(268_000, ge=0, description="stop once this many are kept")
    num_examples: int = Field(5, ge=1, description="tasks shown per request")
    example_source: Literal["seeds", "pool", "mixed"] = Field(
        "seeds",
        description=(
            "where the shown tasks come from. seeds: only the human seed tasks, as the "
            "reference implementation does (default): every request sees well-formed, "
            "varied, human-written examples, so the model's own mistakes and drift are "
            "not fed back to it. pool: seeds plus every task kept so far (a plain reading "
            "of the paper; more novelty, more drift). mixed: machine_examples kept machine "
            "tasks (while there are any) and the rest seeds, as the original Self-Instruct "
            "did. Near-duplicates are checked against the whole pool in every case."
        ),
    )
    machine_examples: int = Field(
        2, ge=0, description="mixed: kept machine tasks among the num_examples shown"
    )
    requests_per_round: int = Field(32, ge=1)
    max_rounds: int | None = Field(
        None, ge=0, description="cap; default 10 * ceil(num_prompts / requests_per_round)"
    )
    max_list_number: int = Field(20, ge=2, description="the list stops at this item number")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(0.98, gt=0.0, le=1.0)
    max_new_tokens: int = Field(1024, ge=1)
    min_words: int = Field(4, ge=0)
    max_words: int = Field(150, ge=1)
    blacklist: list[str] = Field(default_factory=lambda: list(DEFAULT_BLACKLIST))
    rouge_threshold: float = Field(0.7, ge=0.0, le=1.0)

    def round_cap(self) -> int:
        if self.max_rounds is not None:
            return self.max_rounds
        return 10 * math.ceil(self.num_prompts / self.requests_per_round)


@dataclass
class Pool:
    """The tasks examples are drawn from, and the near-duplicate filter over them."""

    ids: list[str] = field(default_factory=list)
    tasks: list[tuple[str, str]] = field(default_factory=list)  # (instruction, input)
    dedup: NearDuplicateFilter = field(default_factory=NearDuplicateFilter)
    n_seeds: int = 0  # the first n_seeds tasks are the human seeds, the rest machine tasks

    def add(self, task_id: str, instruction: str, input_text: str) -> None:
        self.ids.append(task_id)
        self.tasks.append((instruction, input_text))
        self.dedup.add([instruction])


def build_pool(seeds: Sequence[SeedTask], kept: Sequence[dict[str, Any]], threshold: float) -> Pool:
    pool = Pool(dedup=NearDuplicateFilter(threshold), n_seeds=len(seeds))
    for s in seeds:
        pool.add(s.id, s.instruction, s.input)
    for r in kept:
        pool.add(r["id"], r["instruction"], r["input"])
    return pool


def pick_examples(pool: Pool, cfg: SelfInstructConfig, rng: random.Random) -> list[int]:
    """Pool indices of the tasks one request shows (``cfg.example_source``)."""
    seeds, machine = range(pool.n_seeds), range(pool.n_seeds, len(pool.ids))
    if cfg.example_source == "pool":
        return rng.sample(range(len(pool.ids)), min(cfg.num_examples, len(pool.ids)))
    if cfg.example_source == "seeds":
        return rng.sample(seeds, min(cfg.num_examples, len(seeds)))
    n_machine = min(cfg.machine_examples, cfg.num_examples, len(machine))
    picks = rng.sample(machine, n_machine)
    picks += rng.sample(seeds, min(cfg.num_examples - n_machine, len(seeds)))
    rng.shuffle(picks)  # machine tasks are not always shown last, nearest the new item
    return picks


def round_requests(
    pool: Pool, cfg: SelfInstructConfig, round_no: int, seed_for
) -> list[tuple[GenerationRequest, list[str], int]]:
    """(request, parent ids, first item number) for each request of a round."""
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        stop=(f"\n{cfg.max_list_number + 1}.",),  # keeps the separator closing the last item
    )
    out = []
    for k in range(cfg.requests_per_round):
        rng = random.Random(seed_for(SOURCE, "examples", round_no, k))
        picks = pick_examples(pool, cfg, rng)
        prompt, first = list_prompt(HEADER, [pool.tasks[i] for i in picks])
        request = GenerationRequest(prompt, params=params, seed=seed_for(SOURCE, round_no, k))
        out.append((request, [pool.ids[i] for i in picks], first))
    return out


def screen_round(
    round_no: int,
    outputs: Sequence[tuple[GenerationResult, list[str], int]],
    pool: Pool,
    item_filter: ItemFilter,
) -> Batch:
    """Parse and filter one round's continuations in order; kept items join ``pool``.

    ``outputs``: (result, parent ids, first item number) per request, in request order.
    A round is all or nothing: if a request failed, the batch holds only the failures
    (nothing is committed, the pool is untouched) and the next run redoes the round.
    """
    batch = Batch()
    for k, (result, parents, _) in enumerate(outputs):
        if result.error is not None:
            rec = {"id": record_id(SOURCE, round_no, k), "source": SOURCE, "round": round_no}
            batch.failed.append(({**rec, "parents": parents}, result.error))
    if batch.failed:
        return batch
    passing: list[dict[str, Any]] = []
    for k, (result, parents, first) in enumerate(outputs):
        base = {"source": SOURCE, "round": round_no, "parents": parents}
        items = parse_continuation(
            result.text, first, truncated=result.finish_reason == "length", item_filter=item_filter
        )
        for j, item in enumerate(items):
            rec = {
                "id": record_id(SOURCE, round_no, k, j),
                "instruction": item.instruction,
                "input": item.input,
                **base,
            }
            if item.verdict is None:
                passing.append(rec)
            else:
                batch.drop.append(({**rec, "raw": item.raw}, item.verdict))
    matches = pool.dedup.filter([r["instruction"] for r in passing])
    for rec, hit in zip(passing, matches, strict=True):
        if hit is None:
            batch.keep.append(rec)
            pool.ids.append(rec["id"])
            pool.tasks.append((rec["instruction"], rec["input"]))
        else:
            batch.drop.append(({**rec, "similar_to": pool.ids[hit]}, "near_duplicate"))
    return batch


def resume_point(
    rounds: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]]
) -> tuple[int, list[dict[str, Any]]]:
    """The first round not marked done, and the kept records of the rounds before it
    (records of later rounds were committed by a run killed before marking the round).
    ``rounds``: the markers of this phase's finished rounds."""
    next_round = max(r["round"] for r in rounds) + 1 if rounds else 0
    return next_round, [r for r in records if r.get("source") == SOURCE and r["round"] < next_round]


def run_self_instruct(
    ctx: StageContext, cfg: SelfInstructConfig, seeds: list[SeedTask]
) -> Generator[Round, None, bool]:
    """Rounds until the target or the cap; returns False if a round had failed requests."""
    next_round, kept = resume_point(ctx.finished_rounds(SOURCE), ctx.records)
    pool = build_pool(seeds, kept, cfg.rouge_threshold)
    n_kept, cap = len(kept), cfg.round_cap()
    item_filter = ItemFilter(cfg.min_words, cfg.max_words, tuple(cfg.blacklist))
    kept_now = 0  # kept by this process: how many rounds the target may still take
    round_no = next_round
    while n_kept < cfg.num_prompts and round_no < cap:
        work = round_requests(pool, cfg, round_no, ctx.seed_for)
        results = ctx.backend().generate([w[0] for w in work])
        outputs = [(res, par, first) for res, (_, par, first) in zip(results, work, strict=True)]
        batch = screen_round(round_no, outputs, pool, item_filter)
        n_kept, kept_now = n_kept + len(batch.keep), kept_now + len(batch.keep)
        left = cap - round_no - 1
        if kept_now:
            runs = round_no + 1 - next_round
            left = min(left, math.ceil(max(cfg.num_prompts - n_kept, 0) * runs / kept_now))
        info = {"requests": len(work), "pool": len(pool.ids)}
        yield Round(SOURCE, round_no, batch, left=left, info=info)
        if batch.failed:
            return False  # the stage ends incomplete; the next run redoes this round
        ctx.log(f"self-instruct round {round_no}: kept {n_kept}/{cfg.num_prompts}")
        round_no += 1
    return True


def estimate_self_instruct(
    cfg: SelfInstructConfig, seeds: Sequence[SeedTask], count: Callable[[str], int]
) -> Estimate:
    """At most ``round_cap`` rounds of ``requests_per_round`` requests, each a list of
    ``num_examples`` seed-sized tasks and up to ``max_new_tokens`` back; the loop stops
    once ``num_prompts`` are kept, usually long before the cap."""
    requests = cfg.round_cap() * cfg.requests_per_round
    prompt, _ = list_prompt(HEADER, [(s.instruction, s.input) for s in seeds[: cfg.num_examples]])
    return Estimate(
        requests, requests * count(prompt), requests * cfg.max_new_tokens,
        outputs=cfg.num_prompts,
        note=f"self-instruct: at most {cfg.round_cap()} round(s), it stops once "
        f"{cfg.num_prompts} prompts are kept",
    )  # fmt: skip
