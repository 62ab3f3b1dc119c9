"""AlignCoT data: the base model writes reasoning chains for seed queries and checks its
own answers; the chain is as short as the first answer the model judges safe.

Per query (METHOD.md section 2), in rounds batched across a chunk of queries:

0. answer directly, self-check: safe -> an ``answer_only`` chain;
1. else write the question analysis, answer given it, check: safe -> ``analysis_answer``;
2. else write answer guidance, answer given both, check: safe -> ``full``;
   else, with ``unsafe_final: drop`` (the default), the query is dropped
   (``unsafe_after_all_steps``); with ``keep_full`` the full chain is kept all the same,
   its ``final_check`` saying ``unsafe``. Counted either way (stats ``unsafe_final``).

An HH-RLHF query (a ``chosen`` transcript) is the dialogue up to its last human turn, the
reply that follows (the answer our chain replaces) left out: one turn is the question as
it stands; more are one text, the earlier turns as a transcript
(``selfalign.text.aligncot.dialogue_question``, the way MoTE chat renders a history).
``first_turn_only: true`` takes the first human turn alone. Record ids hash the question
text, so single-turn queries keep their ids either way.

Record (``chains/records.jsonl``, read by ``selfalign.mote.parse_chains``)::

    {"id", "question", "analysis": str|None, "guidance": str|None, "answer",
     "length": "answer_only"|"analysis_answer"|"full", "source",
     "final_check": "safe"|"unsafe" (the verdict on the answer kept),
     "checks": [{"chain", "verdict", "parsed", "output"}, ...] (one per round),
     "rejected_answers": [earlier answers judged unsafe], "truncated": ["step@round", ...],
     "trimmed": ["step@round", ...], "cut_copies": ["step@round", ...]}

A step that falls into a loop (a clause of 4+ words written again) is cut before the
repeat, at its last complete sentence, and listed in ``trimmed``: the base model's loops
would otherwise become training targets. A step that copies the chain prompt's
instructions (the model starting the prompt over) is cut before the copy
(``cut_copy``), and listed in ``cut_copies``.

An answer that is no answer (``unanswered``: empty, or the question written again, as
Gemma 3 270M answered two harmful queries its self-check then passed as safe) is not
checked: it fails (``parsed: null``, ``unanswered`` says why), and a chain whose last
answer is none is dropped (``empty_answer``, ``echo_answer``) under either
``unsafe_final`` policy. A generated verdict is read
strictly (``parse_verdict``): an answer-only chain needs a clear "safe", never a hedged
one. Dropped records keep the same fields and a ``reason`` (see ``REASONS``).

Every request is seeded from (query id, step, round), so a killed run resumes to the
same records. Prompt wording and parsing: ``selfalign.text.aligncot``.
"""

from __future__ import annotations

import csv
import functools
import math
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from selfalign.backends import GenerationRequest, SamplingParams, ScoreRequest
from selfalign.config import StageConfig
from selfalign.errors import InputError
from selfalign.stages.api import Batch, Estimate, EstimateContext, MapWork, Stage, StageContext
from selfalign.store import read_jsonl_numbered, record_id
from selfalign.text.aligncot import (
    CHAIN_SYSTEM,
    CHECK_STOP,
    CHECK_SYSTEM,
    LIKELIHOOD_CHOICES,
    ROUND_LENGTHS,
    STEP_STOP,
    chain_prompt,
    check_prompt,
    clean_step,
    cut_copy,
    cut_loop,
    dialogue_question,
    parse_verdict,
)
from selfalign.text.answers import echoes
from selfalign.validation import ExistingPath

CONTENT_FREE = "N/A"  # the message and reply of the calibration check

# Drop reasons, in the order they can happen.
REASONS = (
    "empty_analysis",  # round 1 wrote no analysis
    "empty_guidance",  # round 2 wrote no guidance
    "empty_answer",  # the last answer was empty
    "echo_answer",  # the last answer was the question again
    "unsafe_after_all_steps",  # the full chain's answer still failed its check
)
_QUERY_FIELDS = ("prompt", "question")
_CSV_COLUMNS = ("prompt", "question", "query", "goal", "Behavior")
_HUMAN_TURN = re.compile(r"Human:(.*?)(?:\n\nAssistant:|\Z)", re.DOTALL)
# HH-RLHF speaker markers: a turn starts the transcript or follows a blank line. A
# "Human:" inside a turn (the data has replies that begin "Human: ...") is its text.
_HH_SPEAKER = re.compile(r"(?:\A|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str | Path) else value


class ChainsConfig(StageConfig):
    queries: Annotated[list[ExistingPath], BeforeValidator(_as_list)] = Field(
        min_length=1,
        description="seed query files (.jsonl: HH-RLHF 'chosen' transcripts or "
        "{prompt|question}; .csv: a prompt/question/goal/Behavior column; .txt: one per line)",
    )
    limit: int | None = Field(None, ge=1, description="first N queries of each file")
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_new_tokens: int = Field(384, ge=1, description="per step (analysis, guidance, answer)")
    # How the model judges its own answer: "generate" writes a verdict after "Verdict:",
    # read strictly by ``parse_verdict`` (a hedged safe is unsafe; anything unclear is
    # unparseable_check); "likelihood" compares " yes" and " no" to "is the reply safe?"
    # (needs a backend that scores; never unparseable). With check_calibration: content_free
    # it is the sturdier check for a small base model, so it is the default: of 12 harmful
    # replies, greedy Gemma 3 270M called 11 safe with generate ("The reply is safe."), 12
    # with uncalibrated likelihood, 6 with calibrated likelihood (which still passed 8 of 12
    # safe replies). A server backend without echo + logprobs cannot score: use generate.
    check: Literal["generate", "likelihood"] = "likelihood"
    check_temperature: float = Field(
        0.0, ge=0, description="0: greedy check / the likelier verdict; > 0: sampled"
    )
    check_calibration: Literal["none", "content_free"] = Field(
        "content_free",
        description="likelihood check: content_free subtracts the model's own leaning "
        "toward ' yes' (its log-odds on a check of an 'N/A' message and reply, scored once), "
        "so a model that calls every reply safe must find this one safer than nothing",
    )
    check_max_new_tokens: int = Field(16, ge=1)
    unparseable_check: Literal["unsafe", "safe"] = Field(
        "unsafe",
        description="verdict for a generated check that states no clear verdict "
        "(counted in stats); hedged verdicts already read as unsafe",
    )
    first_turn_only: bool = Field(
        False,
        description="HH-RLHF transcripts: the first human turn alone is the query; default: "
        "the dialogue up to the last human turn (earlier turns as a transcript)",
    )
    unsafe_final: Literal["drop", "keep_full"] = Field(
        "drop",
        description="a chain whose answer fails its check after all three steps: drop "
        "(reason unsafe_after_all_steps) or keep_full (kept with final_check: unsafe). "
        "The paper's counts (1,710 + 608 + 3,682 = 6,000) imply it kept them, but it never "
        "says so; we drop, because MoTE trains on the answer and these are answers the "
        "model itself judged unsafe after every step. Counted either way",
    )
    chunk_size: int = Field(32, ge=1, description="queries per committed batch")


@dataclass(frozen=True)
class Query:
    text: str
    source: str  # file name
    line: int


def _first_human_turn(transcript: str) -> str:
    match = _HUMAN_TURN.search(transcript)
    return match.group(1).strip() if match else ""


def hh_turns(transcript: str) -> list[tuple[str, str]]:
    """(role, text) of each non-empty turn of an HH-RLHF transcript, in order."""
    parts = _HH_SPEAKER.split(transcript)  # [before, speaker, text, speaker, text, ...]
    pairs = zip(parts[1::2], parts[2::2], strict=True)
    turns = [(_HH_ROLES[who], text.strip()) for who, text in pairs]
    return [(role, text) for role, text in turns if text]


def hh_question(transcript: str, first_turn_only: bool = False) -> str:
    """The query an HH-RLHF transcript asks: the dialogue up to and including its last
    human turn (what follows is the reply our chain replaces), or the first human turn
    alone; "" when it has no human turn."""
    if first_turn_only:
        return _first_human_turn(transcript)
    turns = hh_turns(transcript)
    users = [i for i, (role, _) in enumerate(turns) if role == "user"]
    return dialogue_question(turns[: users[-1] + 1]) if users else ""


def _jsonl_queries(path: Path, first_turn_only: bool = False) -> Iterator[tuple[int, str]]:
    for n, row in read_jsonl_numbered(path):
        if isinstance(row.get("chosen"), str):  # HH-RLHF
            yield n, hh_question(row["chosen"], first_turn_only)
            continue
        key = next((k for k in _QUERY_FIELDS if isinstance(row.get(k), str)), None)
        if key is None:
            raise InputError(
                "expected a string field prompt or question, or chosen (HH-RLHF)",
                file=path, line=n,
            )  # fmt: skip
        yield n, row[key].strip()


def _csv_queries(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        column = next((c for c in _CSV_COLUMNS if c in (reader.fieldnames or [])), None)
        if column is None:
            raise InputError(f"expected a column named one of {', '.join(_CSV_COLUMNS)}", file=path)
        try:
            for row in reader:
                yield reader.line_num, (row.get(column) or "").strip()
        except csv.Error as e:
            raise InputError(f"cannot read CSV ({e})", file=path, line=reader.line_num) from None


def _txt_queries(path: Path) -> Iterator[tuple[int, str]]:
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            yield n, line.strip()


def load_queries(
    path: Path, limit: int | None = None, first_turn_only: bool = False
) -> list[Query]:
    """The first ``limit`` queries of a file; a bad one raises InputError (file, line).
    ``first_turn_only``: an HH-RLHF transcript gives its first human turn, not the dialogue."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", file=path)
    jsonl = functools.partial(_jsonl_queries, first_turn_only=first_turn_only)
    readers = {".jsonl": jsonl, ".csv": _csv_queries, ".txt": _txt_queries}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise InputError("expected a .jsonl, .csv or .txt query file", file=path)
    out: list[Query] = []
    try:
        for line, text in reader(path):
            if not text:
                raise InputError("empty query", file=path, line=line)
            out.append(Query(text, path.name, line))
            if limit is not None and len(out) >= limit:
                break
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise InputError("not valid UTF-8", file=path, line=line) from None
    if not out:
        raise InputError("no queries found", file=path)
    return out


def chain_queries(cfg: ChainsConfig) -> dict[str, Query]:
    """Record id -> query, over all files in order; a repeated question is kept once."""
    items: dict[str, Query] = {}
    for path in cfg.queries:
        for query in load_queries(path, cfg.limit, cfg.first_turn_only):
            items.setdefault(record_id("aligncot", query.text), query)
    return items


def _query_files(cfg: ChainsConfig) -> list[Path]:
    """Reads the query files at plan time, so a bad file fails before any work (also under
    --dry-run); their contents are part of the stage's fingerprint."""
    chain_queries(cfg)
    return list(cfg.queries)


@dataclass
class _Chain:
    """One query's chain while its rounds run."""

    rid: str
    query: Query
    analysis: str | None = None
    guidance: str | None = None
    answer: str = ""
    checks: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    trimmed: list[str] = field(default_factory=list)
    cut_copies: list[str] = field(default_factory=list)
    error: str | None = None

    def base(self) -> dict[str, Any]:
        return {"id": self.rid, "question": self.query.text, "source": self.query.source}

    def record(self, length: str, final_check: str | None = None) -> dict[str, Any]:
        """The chain as written so far; a kept one has ``final_check`` (its last verdict)."""
        return {
            **self.base(),
            "analysis": self.analysis,
            "guidance": self.guidance,
            "answer": self.answer,
            "length": length,
            **({"final_check": final_check} if final_check is not None else {}),
            "checks": self.checks,
            "rejected_answers": self.rejected,
            "truncated": self.truncated,
            "trimmed": self.trimmed,
            "cut_copies": self.cut_copies,
        }


class _Rounds:
    """The backend calls of one chunk: each writes one step, or checks, for many chains."""

    def __init__(self, ctx: StageContext, cfg: ChainsConfig) -> None:
        self.ctx, self.cfg, self.backend = ctx, cfg, ctx.backend()
        self.params = SamplingParams(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
            stop=STEP_STOP,
        )  # fmt: skip
        self.check_params = SamplingParams(
            max_new_tokens=cfg.check_max_new_tokens, temperature=cfg.check_temperature,
            stop=CHECK_STOP,
        )  # fmt: skip

    def write(self, chains: list[_Chain], step: str, rnd: int) -> None:
        """Generate ``step`` for every chain (the answer replaces an earlier answer)."""
        if not chains:
            return
        requests = [
            GenerationRequest(
                prompt=chain_prompt(c.query.text, step, c.analysis, c.guidance),
                prefix=CHAIN_SYSTEM,
                params=self.params,
                seed=self.ctx.seed_for(c.rid, step, rnd),
            )
            for c in chains
        ]
        for chain, result in zip(chains, self.backend.generate(requests), strict=True):
            if result.error is not None:
                chain.error = result.error
                continue
            if result.finish_reason == "length":
                chain.truncated.append(f"{step}@{ROUND_LENGTHS[rnd]}")
            where = f"{step}@{ROUND_LENGTHS[rnd]}"
            text, copied = cut_copy(clean_step(result.text), CHAIN_SYSTEM, chain.query.text)
            if copied:
                chain.cut_copies.append(where)
            text, looped = cut_loop(text)
            if looped:
                chain.trimmed.append(where)
            setattr(chain, step, text)

    def check(self, chains: list[_Chain], rnd: int) -> dict[str, bool]:
        """Record id -> whether the chain's current answer is judged safe (one that is no
        answer, ``unanswered``, is not); each check is added to the chain. Sets ``error``
        on failures."""
        reasons = {c.rid: unanswered(c.answer, c.query.text) for c in chains}
        todo = [c for c in chains if reasons[c.rid] is None]
        if self.cfg.check == "likelihood":
            outcomes = self._check_likelihood(todo, rnd)
        else:
            outcomes = self._check_generate(todo, rnd)
        safe = {}
        for chain in chains:
            if chain.error is not None:
                continue
            entry = outcomes.get(chain.rid) or {
                "verdict": "unsafe", "parsed": None, "output": None,
                "unanswered": reasons[chain.rid],
            }  # fmt: skip
            chain.checks.append({"chain": ROUND_LENGTHS[rnd], **entry})
            safe[chain.rid] = entry["verdict"] == "safe"
        return safe

    def _check_generate(self, chains: list[_Chain], rnd: int) -> dict[str, dict[str, Any]]:
        if not chains:
            return {}
        requests = [
            GenerationRequest(
                prompt=check_prompt(c.query.text, c.answer, "generate"),
                prefix=CHECK_SYSTEM,
                params=self.check_params,
                seed=self.ctx.seed_for(c.rid, "check", rnd),
            )
            for c in chains
        ]
        out = {}
        for chain, result in zip(chains, self.backend.generate(requests), strict=True):
            if result.error is not None:
                chain.error = result.error
                continue
            verdict = parse_verdict(result.text, reply=chain.answer)
            out[chain.rid] = {
                "verdict": verdict or self.cfg.unparseable_check,
                "parsed": verdict is not None,
                "output": result.text,
            }
        return out

    def _yes_no(self, pairs: list[tuple[str, str]]) -> list[tuple[float, float]]:
        """The log-likelihoods of the two verdicts for each (message, reply)."""
        requests = [
            ScoreRequest(CHECK_SYSTEM + check_prompt(question, answer, "likelihood"), choice)
            for question, answer in pairs
            for choice in LIKELIHOOD_CHOICES
        ]
        scores = self.backend.score(requests) if requests else []
        return list(zip(scores[0::2], scores[1::2], strict=True))

    @functools.cached_property
    def prior(self) -> float:
        """The log-odds of safe the check gives a content-free message and reply (Zhao et
        al. 2021, "Calibrate before use"); 0 when calibration is off."""
        if self.cfg.check_calibration == "none":
            return 0.0
        ((yes, no),) = self._yes_no([(CONTENT_FREE, CONTENT_FREE)])
        return yes - no

    def _check_likelihood(self, chains: list[_Chain], rnd: int) -> dict[str, dict[str, Any]]:
        out = {}
        scores = self._yes_no([(c.query.text, c.answer) for c in chains])
        for chain, (yes, no) in zip(chains, scores, strict=True):
            margin = yes - no - self.prior
            t = self.cfg.check_temperature
            if t > 0:  # sample the verdict from the model's two-way distribution
                p_safe = 1.0 / (1.0 + math.exp(max(-700.0, min(700.0, -margin / t))))
                draw = random.Random(self.ctx.seed_for(chain.rid, "check", rnd)).random()
                safe = draw < p_safe
            else:
                safe = margin > 0
            output = {"yes": round(yes, 4), "no": round(no, 4)}
            if self.cfg.check_calibration != "none":
                output["prior"] = round(self.prior, 4)
            out[chain.rid] = {"verdict": "safe" if safe else "unsafe", "parsed": True,
                              "output": output}  # fmt: skip
        return out


def unanswered(answer: str, question: str) -> str | None:
    """Why ``answer`` answers nothing: ``empty``, or ``echo`` when it is mostly the
    question again (each repeats most of the other's word 4-grams: a restated question
    followed by a reply of its own is an answer); None for an answer."""
    if not answer.strip():
        return "empty"
    return "echo" if echoes(answer, question) and echoes(question, answer) else None


def _run_chunk(rounds: _Rounds, chains: list[_Chain]) -> Batch:
    """All rounds for a chunk of queries; each chain ends kept, dropped or failed."""
    batch = Batch()

    def settle(live: list[_Chain]) -> list[_Chain]:
        """Chains whose request failed leave (uncommitted: asked again on resume)."""
        batch.failed.extend((c.base(), c.error) for c in live if c.error is not None)
        return [c for c in live if c.error is None]

    live = chains
    for rnd, length in enumerate(ROUND_LENGTHS):
        if rnd > 0:
            step = "analysis" if rnd == 1 else "guidance"
            rounds.write(live, step, rnd)
            live = settle(live)
            batch.drop.extend(
                (c.record(length), f"empty_{step}") for c in live if not getattr(c, step)
            )
            live = [c for c in live if getattr(c, step)]
            for chain in live:
                if chain.answer:
                    chain.rejected.append(chain.answer)
        rounds.write(live, "answer", rnd)
        live = settle(live)
        verdicts = rounds.check(live, rnd)
        live = settle(live)
        batch.keep.extend(c.record(length, "safe") for c in live if verdicts[c.rid])
        live = [c for c in live if not verdicts[c.rid]]
    for chain in live:
        reason = unanswered(chain.answer, chain.query.text)
        if reason is not None:
            batch.drop.append((chain.record("full"), f"{reason}_answer"))
        elif rounds.cfg.unsafe_final == "keep_full":
            batch.keep.append(chain.record("full", "unsafe"))
        else:
            batch.drop.append((chain.record("full"), "unsafe_after_all_steps"))
    return batch


def _steps_listed(records: list[dict], key: str) -> dict[str, int]:
    """How many ``step@round`` entries the records list under ``key``, per step."""
    return dict(Counter(t.split("@")[0] for r in records for t in r.get(key, [])))


def summarize(records: list[dict], dropped: list[dict], ctx: StageContext) -> dict[str, Any]:
    """Chains by length, drops by reason, and how the self-checks went."""
    checks = [c for r in records + dropped for c in r.get("checks", [])]
    return {
        "chains_by_length": {n: sum(r["length"] == n for r in records) for n in ROUND_LENGTHS},
        "dropped_by_reason": {n: sum(r["reason"] == n for r in dropped) for n in REASONS},
        "checks": {
            "total": len(checks),
            "safe": sum(c["verdict"] == "safe" for c in checks),
            "unsafe": sum(c["verdict"] == "unsafe" for c in checks),
            "unparsed": sum(c["parsed"] is False for c in checks),
            "empty_answer": sum(c.get("unanswered") == "empty" for c in checks),
            "echo_answer": sum(c.get("unanswered") == "echo" for c in checks),
            "method": ctx.config.check,
            "unparseable_as": ctx.config.unparseable_check,
        },
        "truncated_steps": _steps_listed(records + dropped, "truncated"),
        "trimmed_steps": _steps_listed(records + dropped, "trimmed"),
        "copied_steps": _steps_listed(records + dropped, "cut_copies"),
        "unsafe_final": {  # chains whose answer failed every check, by what became of them
            "policy": ctx.config.unsafe_final,
            "kept": sum(r.get("final_check") == "unsafe" for r in records),
            "dropped": sum(r["reason"] == "unsafe_after_all_steps" for r in dropped),
        },
    }


def run_chains(ctx: StageContext) -> Iterator[MapWork]:
    cfg: ChainsConfig = ctx.config  # type: ignore[assignment]
    rounds: list[_Rounds] = []

    def start() -> None:
        rounds.append(_Rounds(ctx, cfg))
        if cfg.check == "likelihood" and not rounds[0].backend.can_score:
            raise InputError(
                f"check: likelihood needs a backend that can score; {rounds[0].backend.name} "
                "cannot", field="stages.chains.check",
            )  # fmt: skip

    def write(chunk: list[tuple[str, Query]]) -> Batch:
        return _run_chunk(rounds[0], [_Chain(i, query) for i, query in chunk])

    yield MapWork(chain_queries(cfg), cfg.chunk_size, write, start=start)


SAMPLE = 64  # queries whose tokens are counted; the rest are taken to be of their mean size


def estimate(cfg: ChainsConfig, ectx: EstimateContext) -> Estimate:
    """Per query at most three rounds: five steps written (three answers, the analysis,
    the guidance), later ones reading the earlier steps, and three self-checks (two scored
    verdicts each under ``check: likelihood``); one record each."""
    queries = list(chain_queries(cfg).values())
    n, m = len(queries), cfg.max_new_tokens
    count = ectx.count_tokens
    sample = queries[:SAMPLE]
    step = sum(count(CHAIN_SYSTEM + chain_prompt(q.text, "answer")) for q in sample) / len(sample)
    check = sum(count(CHECK_SYSTEM + check_prompt(q.text, "", cfg.check)) for q in sample)
    check /= len(sample)
    # steps: 5 prompts, plus the analysis read 3 times and the guidance once, all <= m
    prompt = n * (5 * step + 4 * m) + n * 3 * (check + m) * (2 if cfg.check == "likelihood" else 1)
    checks = n * 3 * (2 if cfg.check == "likelihood" else 1)
    completion = n * 5 * m + (n * 3 * cfg.check_max_new_tokens if cfg.check == "generate" else 0)
    note = None
    if cfg.check == "likelihood":
        note = f"{checks:,} scored self-checks generate nothing: their time is not estimated"
    return Estimate(n * 5 + checks, round(prompt), completion, outputs=n, note=note)


STAGE = Stage(
    "chains", ChainsConfig, run_chains, summarize=summarize, data_files=_query_files,
    estimate=estimate,
    version=2,  # 2: an answer echoing the question is no answer; copies of the prompt cut
)  # fmt: skip
