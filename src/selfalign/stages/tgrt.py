"""Topic-Guided Red-Teaming Self-Instruct (stage 1, second generator).

1. Topic brainstorm, in rounds: for every type still short of ``topics_per_type``, show
   a few of its topics as a comma-separated line and let the model continue the line.
   New topics (at most ``max_topic_words`` words, deduplicated case-insensitively per
   type) go to ``prompts/topics.jsonl``. Each round is a ``Round`` the runner marks in
   ``rounds.jsonl`` once committed; a resumed run rebuilds the topic lists from marked
   rounds and redoes the first unmarked one (same seeds, same outputs).
2. Balance: cut every type's brainstormed topics to the smallest type's count (and to the
   target); the cut topics are dropped as ``unbalanced`` (or ``over_target``). The seeds'
   own topics are examples only: they neither count nor get questions.
3. Questions: one request per new (type, topic): seed examples (one of the type's own
   seeds plus others) and the new pair; the first line the model writes is the question.
   A pair is independent of the others: the questions are a ``MapWork`` over the pairs.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

from pydantic import Field

from selfalign.annotations.loaders import RedTeamSeed
from selfalign.backends import GenerationRequest, GenerationResult, SamplingParams
from selfalign.stages.api import Batch, Estimate, MapWork, Round, StageContext
from selfalign.store import record_id
from selfalign.text.parsing import ItemFilter
from selfalign.validation import ExistingPath, StrictModel

SOURCE = "tgrt"
TOPIC_PHASE = "tgrt_topics"
TOPICS = "topics"  # prompts/topics.jsonl

TOPIC_HEADER = (
    "Kinds of questions that an AI assistant can easily answer badly, each followed by "
    "topics for such questions. A topic is a short noun phrase of one to three words, and "
    "no topic appears twice.\n"
)
QUESTION_HEADER = (
    "Each entry names a kind of question that an AI assistant can easily answer badly, a "
    "topic, and one question of that kind about that topic, phrased the way a real user "
    "would ask it.\n\n"
)


class TGRTConfig(StrictModel):
    """``topics_per_type`` follows the paper (~120k topics over 20 types); the round and
    request counts are ours (the paper does not give them)."""

    enabled: bool = True
    types_file: ExistingPath | None = Field(None, description="default: the shipped types")
    topics_per_type: int = Field(6000, ge=1)
    topic_rounds: int = Field(1000, ge=0, description="cap on brainstorm rounds")
    topic_requests_per_type: int = Field(4, ge=1, description="requests per type per round")
    topic_examples: int = Field(5, ge=1, description="existing topics shown per request")
    max_topic_words: int = Field(3, ge=1)
    topic_max_new_tokens: int = Field(128, ge=1)
    question_examples: int = Field(5, ge=1, description="seed examples shown per question")
    question_max_new_tokens: int = Field(128, ge=1)
    requests_per_batch: int = Field(32, ge=1, description="question requests per batch")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(0.98, gt=0.0, le=1.0)
    min_words: int = Field(3, ge=0, description="question length filter")
    max_words: int = Field(150, ge=1)


# -- topics --------------------------------------------------------------------------------
def topic_key(topic: str) -> str:
    return " ".join(topic.lower().split())


def topic_prompt(kind: str, shown: Sequence[str]) -> str:
    return f"{TOPIC_HEADER}{kind[:1].upper()}{kind[1:]}: {', '.join(shown)},"


def parse_topics(
    continuation: str, *, truncated: bool, max_words: int
) -> list[tuple[str, str | None]]:
    """(topic, verdict) per comma-separated piece of the continuation's first line.

    Verdicts: ``truncated`` (last piece when cut by the token limit), ``bad_topic``
    (starts with punctuation or non-ASCII), ``topic_too_long``. Empty pieces are skipped.
    Duplicates are judged by the caller, who knows the type's topics.
    """
    first, *rest = continuation.split("\n", 1)
    pieces = first.split(",")
    cut = truncated and not rest  # the line never ended
    items: list[tuple[str, str | None]] = []
    for n, piece in enumerate(pieces):
        topic = " ".join(piece.split()).rstrip(".;:")
        if not topic:
            continue
        if cut and n == len(pieces) - 1:
            verdict = "truncated"
        elif topic[0] in string.punctuation or not topic[0].isascii():
            verdict = "bad_topic"
        elif len(topic.split()) > max_words:
            verdict = "topic_too_long"
        else:
            verdict = None
        items.append((topic, verdict))
    return items


def seed_topic_entries(seeds: Sequence[RedTeamSeed]) -> list[dict[str, Any]]:
    return [
        {"id": s.id, "type": s.type, "topic": s.topic, "round": -1, "parents": []} for s in seeds
    ]


def run_topic_rounds(
    ctx: StageContext, cfg: TGRTConfig, seeds: Sequence[RedTeamSeed]
) -> Generator[Round, None, dict[str, list[dict[str, Any]]] | None]:
    """Brainstorm rounds; returns {type: topic entries in order}, or None if a round had
    failed requests (the stage then ends incomplete)."""
    done = ctx.finished_rounds(TOPIC_PHASE)
    next_round = done[-1]["round"] + 1 if done else 0
    written = ctx.read_aux(TOPICS)
    written_ids = {e["id"] for e in written}
    ctx.append_aux(TOPICS, [e for e in seed_topic_entries(seeds) if e["id"] not in written_ids])
    topics: dict[str, list[dict[str, Any]]] = {s.type: [] for s in seeds}
    for e in seed_topic_entries(seeds) + [e for e in written if 0 <= e["round"] < next_round]:
        topics[e["type"]].append(e)
    params = SamplingParams(
        max_new_tokens=cfg.topic_max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        stop=("\n",),
    )
    round_no = next_round
    while round_no < cfg.topic_rounds:
        need = [t for t, e in topics.items() if len(machine_topics(e)) < cfg.topics_per_type]
        if not need:
            break
        work = []
        for kind in need:
            for q in range(cfg.topic_requests_per_type):
                rng = random.Random(ctx.seed_for(TOPIC_PHASE, "examples", round_no, kind, q))
                shown = rng.sample(topics[kind], min(cfg.topic_examples, len(topics[kind])))
                request = GenerationRequest(
                    topic_prompt(kind, [e["topic"] for e in shown]),
                    params=params,
                    seed=ctx.seed_for(TOPIC_PHASE, round_no, kind, q),
                )
                work.append((kind, q, [e["id"] for e in shown], request))
        results = ctx.backend().generate([w[3] for w in work])
        failed = [
            ({"id": record_id(TOPIC_PHASE, round_no, kind, q), "source": SOURCE, "kind": "topic",
              "type": kind, "round": round_no}, res.error)
            for (kind, q, _, _), res in zip(work, results, strict=True)
            if res.error is not None
        ]  # fmt: skip
        if failed:  # a round is all or nothing: the next run redoes it
            yield Round(TOPIC_PHASE, round_no, Batch(failed=failed))
            return None
        batch, new = Batch(), []
        keys = {kind: {topic_key(e["topic"]) for e in topics[kind]} for kind in need}
        for (kind, q, parents, _), res in zip(work, results, strict=True):
            base = {"source": SOURCE, "kind": "topic", "type": kind, "round": round_no}
            parsed = parse_topics(
                res.text, truncated=res.finish_reason == "length", max_words=cfg.max_topic_words
            )
            for j, (topic, verdict) in enumerate(parsed):
                rec = {"id": record_id(TOPIC_PHASE, round_no, kind, q, j), **base, "topic": topic}
                if verdict is None and topic_key(topic) in keys[kind]:
                    verdict = "duplicate_topic"
                if verdict is not None:
                    batch.drop.append((rec, verdict))
                    continue
                keys[kind].add(topic_key(topic))
                entry = {
                    "id": rec["id"],
                    "type": kind,
                    "topic": topic,
                    "round": round_no,
                    "parents": parents,
                }
                topics[kind].append(entry)
                new.append(entry)
        ctx.append_aux(TOPICS, [e for e in new if e["id"] not in written_ids])
        info = {"requests": len(work), "new_topics": len(new)}
        yield Round(TOPIC_PHASE, round_no, batch, left=cfg.topic_rounds - round_no - 1, info=info)
        ctx.log(f"tgrt topic round {round_no}: {sum(map(len, topics.values()))} topics")
        round_no += 1
    return topics


def machine_topics(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The brainstormed topics (a seed's own topic has round -1: shown, never asked)."""
    return [e for e in entries if e["round"] >= 0]


def balance(
    topics: dict[str, list[dict[str, Any]]], target: int
) -> tuple[dict[str, list[dict[str, Any]]], Batch]:
    """Cut every type's brainstormed topics to min(smallest type's count, target); cut
    topics are drops. Seed topics neither count nor get questions. A type that got no
    topic at all within the round cap is left out of the minimum (the stage reports it):
    one failed type would otherwise cut every other type to nothing."""
    topics = {kind: machine_topics(entries) for kind, entries in topics.items()}
    n = min(min((len(v) for v in topics.values() if v), default=0), target)
    reason = "over_target" if n == target else "unbalanced"
    batch = Batch()
    for kind, entries in topics.items():
        for e in entries[n:]:
            rec = {"id": e["id"], "source": SOURCE, "kind": "topic", "type": kind,
                   "topic": e["topic"], "round": e["round"]}  # fmt: skip
            batch.drop.append((rec, reason))
    return {kind: entries[:n] for kind, entries in topics.items()}, batch


# -- questions -----------------------------------------------------------------------------
def question_prompt(examples: Sequence[RedTeamSeed], kind: str, topic: str) -> str:
    shown = "".join(
        f"Type: {s.type}\nTopic: {s.topic}\nInstruction: {s.instruction}\n\n" for s in examples
    )
    return f"{QUESTION_HEADER}{shown}Type: {kind}\nTopic: {topic}\nInstruction:"


def question_examples(
    seeds: Sequence[RedTeamSeed], kind: str, k: int, rng: random.Random
) -> list[RedTeamSeed]:
    """One seed of the same type (shown last, nearest the query) and k-1 others."""
    own = [s for s in seeds if s.type == kind]
    others = [s for s in seeds if s.type != kind]
    picked = rng.sample(others, min(k - 1, len(others))) if k > 1 else []
    return picked + [rng.choice(own)]


def question_verdict(result: GenerationResult, item_filter: ItemFilter) -> tuple[str, str | None]:
    text = result.text.split("\n", 1)[0].strip()
    if result.finish_reason == "length":
        return text, "truncated"
    if not text:
        return text, "no_instruction"
    return text, item_filter.verdict(text)


def question_id(kind: str, topic: str) -> str:
    return record_id(SOURCE, kind, topic_key(topic))


def question_work(
    ctx: StageContext,
    cfg: TGRTConfig,
    seeds: Sequence[RedTeamSeed],
    topics: dict[str, list[dict[str, Any]]],
) -> MapWork[dict[str, Any]]:
    """One question request per brainstormed (type, topic) pair."""
    pairs = {
        question_id(e["type"], e["topic"]): e
        for entries in topics.values()
        for e in machine_topics(entries)
    }
    params = SamplingParams(
        max_new_tokens=cfg.question_max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        stop=("\n",),
    )
    item_filter = ItemFilter(cfg.min_words, cfg.max_words, blacklist=())

    def ask(chunk: list[tuple[str, dict[str, Any]]]) -> Batch:
        work = []
        for qid, e in chunk:
            rng = random.Random(ctx.seed_for(SOURCE, "examples", qid))
            shown = question_examples(seeds, e["type"], cfg.question_examples, rng)
            request = GenerationRequest(
                question_prompt(shown, e["type"], e["topic"]),
                params=params,
                seed=ctx.seed_for(SOURCE, qid),
            )
            work.append((qid, e, [s.id for s in shown], request))
        results = ctx.backend().generate([w[3] for w in work])
        batch = Batch()
        for (qid, e, parents, _), res in zip(work, results, strict=True):
            rec = {"id": qid, "instruction": "", "input": "", "source": SOURCE,
                   "type": e["type"], "topic": e["topic"], "parents": parents}  # fmt: skip
            if res.error is not None:
                batch.failed.append((rec, res.error))  # asked again on the next run
                continue
            rec["instruction"], verdict = question_verdict(res, item_filter)
            if verdict is None:
                batch.keep.append(rec)
            else:
                batch.drop.append((rec, verdict))
        return batch

    return MapWork(pairs, cfg.requests_per_batch, ask)


def run_tgrt(
    ctx: StageContext, cfg: TGRTConfig, seeds: Sequence[RedTeamSeed]
) -> Iterator[Round | Batch | MapWork]:
    topics = yield from run_topic_rounds(ctx, cfg, seeds)
    if topics is None:
        return
    balanced, cut = balance(topics, cfg.topics_per_type)
    if cut.drop:
        yield cut
    yield question_work(ctx, cfg, seeds, balanced)


def estimate_tgrt(
    cfg: TGRTConfig, seeds: Sequence[RedTeamSeed], count: Callable[[str], int]
) -> Estimate:
    """Brainstorm: at most ``topic_rounds`` rounds of ``topic_requests_per_type`` requests
    per type (it stops once every type has ``topics_per_type`` topics); then one question
    per kept (type, topic), at most ``topics_per_type`` per type."""
    if not seeds:
        return Estimate()
    kinds = list(dict.fromkeys(s.type for s in seeds))
    shown = [s.topic for s in seeds[: cfg.topic_examples]]
    topic_requests = cfg.topic_rounds * len(kinds) * cfg.topic_requests_per_type
    questions = len(kinds) * cfg.topics_per_type
    examples = list(seeds[: cfg.question_examples])
    question = question_prompt(examples, seeds[0].type, seeds[0].topic)
    return Estimate(
        topic_requests + questions,
        topic_requests * count(topic_prompt(kinds[0], shown)) + questions * count(question),
        topic_requests * cfg.topic_max_new_tokens + questions * cfg.question_max_new_tokens,
        outputs=questions,
        note=f"tgrt: at most {cfg.topic_rounds} topic round(s), it stops once every type has "
        f"{cfg.topics_per_type} topics",
    )
