"""Where a Self-Instruct request's in-context examples come from (``example_source``)."""

from __future__ import annotations

import pytest

from selfalign.annotations.loaders import SeedTask
from selfalign.stages.self_instruct import SelfInstructConfig, build_pool, round_requests
from selfalign.store import stable_hash

SEEDS = [SeedTask(f"seed{i}", f"Write a story about a lost key, take {i}.", "") for i in range(12)]
KEPT = [
    {"id": f"machine{i}", "instruction": f"Explain how a dam stops floods, part {i}.", "input": ""}
    for i in range(6)
]


def seed_for(*parts: object) -> int:
    return int(stable_hash(list(parts), 8), 16)


def parents(cfg: SelfInstructConfig, kept: list[dict], round_no: int = 4) -> list[list[str]]:
    pool = build_pool(SEEDS, kept, threshold=0.7)
    return [p for _, p, _ in round_requests(pool, cfg, round_no, seed_for)]


def machine(ids: list[str]) -> int:
    return sum(i.startswith("machine") for i in ids)


def test_examples_come_from_the_human_seeds_by_default():
    cfg = SelfInstructConfig(requests_per_round=40)
    assert cfg.example_source == "seeds"
    shown = parents(cfg, KEPT)
    assert all(len(p) == 5 and len(set(p)) == 5 and machine(p) == 0 for p in shown)


def test_pool_examples_include_kept_machine_tasks():
    shown = parents(SelfInstructConfig(requests_per_round=40, example_source="pool"), KEPT)
    assert all(len(p) == 5 for p in shown) and sum(machine(p) for p in shown) > 0


@pytest.mark.parametrize(
    "n_kept, machine_examples, expected", [(6, 2, 2), (1, 2, 1), (0, 2, 0), (6, 9, 5)]
)
def test_mixed_examples_are_mostly_seeds(n_kept, machine_examples, expected):
    cfg = SelfInstructConfig(
        requests_per_round=30, example_source="mixed", machine_examples=machine_examples
    )
    shown = parents(cfg, KEPT[:n_kept])
    assert all(len(p) == 5 and len(set(p)) == 5 and machine(p) == expected for p in shown)
    if expected == 2:  # machine tasks are not always in the same places of the list
        places = {tuple(i for i, x in enumerate(p) if x.startswith("machine")) for p in shown}
        assert len(places) > 1


@pytest.mark.parametrize("source", ["seeds", "pool", "mixed"])
def test_the_same_round_shows_the_same_examples_again(source):
    """Resume rebuilds the pool and redoes the round: its prompts must not change."""
    cfg = SelfInstructConfig(requests_per_round=8, example_source=source)
    pool = build_pool(SEEDS, KEPT, threshold=0.7)
    first = [(r.prompt, r.seed, p) for r, p, _ in round_requests(pool, cfg, 3, seed_for)]
    again = build_pool(SEEDS, KEPT, threshold=0.7)
    assert [(r.prompt, r.seed, p) for r, p, _ in round_requests(again, cfg, 3, seed_for)] == first
    other = [p for _, p, _ in round_requests(pool, cfg, 4, seed_for)]
    assert other != [p for *_, p in first]  # a different round draws anew
