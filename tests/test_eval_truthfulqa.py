"""TruthfulQA MC: equal to lm-evaluation-harness, shared contexts run once, Dromedary
protocol scores every candidate, bad data exits 2 naming the file."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from selfalign.backends import ScoreRequest
from selfalign.backends.hf import HFBackend
from selfalign.cli import main
from selfalign.eval.truthfulqa import (
    TARGET_DELIMITER,
    dromedary_context,
    evaluate_truthfulqa,
    hashed_tiebreak,
    lm_eval_context,
    load_truthfulqa,
    mc2_mass,
    score_dromedary,
    score_lm_eval,
)
from selfalign.tiny import make_tiny_model

N_HARNESS = 100  # questions compared with the harness


@pytest.fixture(scope="module")
def slim_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A slimmer variant of the tiny model: the harness runs 1,230 full ~700-token
    sequences for 100 questions, too slow on 2 shared cores with the standard one."""
    return make_tiny_model(
        tmp_path_factory.mktemp("slim") / "model", seed=0, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip


@pytest.fixture(scope="module")
def backend(tiny_model: Path) -> HFBackend:
    return HFBackend(tiny_model, batch_size=8, dtype="float32", device="cpu")


def to_hf_rows(mc_task: Path) -> list[dict]:
    """The HF ``truthful_qa`` / ``multiple_choice`` layout of the same questions."""
    rows = json.loads(mc_task.read_text(encoding="utf-8"))
    return [
        {
            "question": r["question"],
            **{
                k: {"choices": list(r[k]), "labels": list(r[k].values())}
                for k in ("mc1_targets", "mc2_targets")
            },
        }
        for r in rows
    ]


def harness_tasks(folder: Path, data: Path) -> list[str]:
    """lm-eval's own truthfulqa_mc1/mc2 task files, pointed at a local JSONL copy."""
    import lm_eval

    src = Path(lm_eval.__file__).parent / "tasks" / "truthfulqa"
    folder.mkdir()
    names = []
    for name in ("truthfulqa_mc1", "truthfulqa_mc2"):
        text = (src / f"{name}.yaml").read_text(encoding="utf-8")
        text = re.sub(r"tag:\n(  - .*\n)+", "", text)
        text = text.replace(f"task: {name}", f"task: local_{name}")
        text = text.replace("include: truthfulqa_mc1.yaml", "include: local_truthfulqa_mc1.yaml")
        text = re.sub(r"dataset_path: .*", "dataset_path: json", text)
        text = re.sub(
            r"dataset_name: .*",
            "dataset_name: null\ndataset_kwargs:\n"
            f"  data_files:\n    validation: {data}\n  cache_dir: {folder / 'cache'}",
            text,
        )
        (folder / f"local_{name}.yaml").write_text(text, encoding="utf-8")
        names.append(f"local_{name}")
    shutil.copy(src / "utils.py", folder / "utils.py")
    return names


@pytest.mark.slow
def test_equals_lm_evaluation_harness(
    mc_task: Path, slim_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("lm_eval", reason="lm_eval is not installed (pip install lm_eval)")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    hf_rows = tmp_path / "tqa.jsonl"
    hf_rows.write_text("".join(json.dumps(r) + "\n" for r in to_hf_rows(mc_task)), encoding="utf-8")
    tasks = harness_tasks(tmp_path / "tasks", hf_rows)
    lm = HFLM(pretrained=str(slim_model), device="cpu", batch_size=16, dtype="float32")
    out = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(tmp_path / "tasks"),
        include_defaults=False), limit=N_HARNESS, log_samples=True, bootstrap_iters=0,
    )  # fmt: skip
    theirs = {k: out["results"][f"local_truthfulqa_{k}"]["acc,none"] for k in ("mc1", "mc2")}
    samples = {
        k: sorted(out["samples"][f"local_truthfulqa_{k}"], key=lambda s: s["doc_id"])
        for k in ("mc1", "mc2")
    }
    assert [len(s) for s in samples.values()] == [N_HARNESS, N_HARNESS]

    backend = HFBackend(slim_model, batch_size=16, dtype="float32", device="cpu")
    ours, details = evaluate_truthfulqa(backend, mc_task, model="slim", limit=N_HARNESS)
    # Same prompt, same continuations, same per-choice log-likelihoods.
    for k in ("mc1", "mc2"):
        for s, d in zip(samples[k], details, strict=True):
            ctx = lm_eval_context(d["question"])
            assert [tuple(a) for a in s["arguments"]] == [
                (ctx, TARGET_DELIMITER + c) for c in s["doc"][f"{k}_targets"]["choices"]
            ]
            theirs_ll = [r[0] for r in s["filtered_resps"]]
            assert d[f"{k}_lls"] == pytest.approx(theirs_ll, rel=1e-5, abs=1e-4)
    deltas = {k: abs(ours.value(k) - theirs[k]) for k in ("mc1", "mc2")}
    print(
        f"harness {theirs}, ours mc1={ours.value('mc1')} mc2={ours.value('mc2')}, deltas {deltas}"
    )
    assert deltas["mc1"] <= 1e-6 and deltas["mc2"] <= 1e-6
    assert {m.metric: m.n for m in ours.metrics} == {"mc1": N_HARNESS, "mc2": N_HARNESS}

    # The HF layout (JSONL and Parquet) gives the very same scores as mc_task.json.
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "validation.parquet"
    pq.write_table(pa.Table.from_pylist(to_hf_rows(mc_task)[:20]), parquet)
    for data in (hf_rows, parquet):
        _, again = evaluate_truthfulqa(backend, data, model="slim", limit=20)
        assert again == details[:20]


def test_mc2_is_true_mass_by_labels() -> None:
    # Labels, not positions: TruthfulQA questions 164 and 607 (0-based) list a true choice after
    # false ones; lm_eval 0.4.13 masks by label too.
    lls, labels = [-1.0, -2.0, -0.5, -3.0], [1, 0, 1, 0]
    import math

    p = [math.exp(v) for v in lls]
    assert mc2_mass(lls, labels) == pytest.approx((p[0] + p[2]) / sum(p), abs=1e-12)
    assert mc2_mass([-900.0, -1000.0], [1, 0]) == pytest.approx(1.0)  # no underflow to nan


def test_each_context_runs_once(backend: HFBackend, mc_task: Path) -> None:
    questions = load_truthfulqa(mc_task)[:3]
    before = backend.stats.prefill_tokens
    scores = score_lm_eval(backend, questions)
    expected = 0
    for q in questions:
        ctx = lm_eval_context(q.question)
        ctx_ids, _ = backend.encode_pair(ctx, TARGET_DELIMITER + q.mc1_choices[0])
        distinct = dict.fromkeys((*q.mc1_choices, *q.mc2_choices))
        conts = [backend.encode_pair(ctx, TARGET_DELIMITER + c)[1] for c in distinct]
        # context minus its last token once; then last context token + continuation per choice
        expected += (len(ctx_ids) - 1) + sum(1 + len(c) for c in conts)
    assert backend.stats.prefill_tokens - before == expected
    # ...and the numbers are those of scoring each pair on its own.
    q, s = questions[1], scores[1]
    alone = [
        backend.score([ScoreRequest(lm_eval_context(q.question), " " + c)])[0]
        for c in q.mc2_choices
    ]
    assert s.mc2_lls == pytest.approx(alone, abs=1e-4)


def test_context_starts_with_bos_like_lm_eval(backend: HFBackend) -> None:
    ctx, cont = backend.encode_pair("Q: Why?\nA:", " Because.")
    assert ctx[0] == backend.tokenizer.bos_token_id
    assert ctx + cont == backend.tokenizer("Q: Why?\nA: Because.").input_ids


def test_prompt_is_lm_evals(mc_task: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cheap check of the prompt the slow test pins: the harness's own task renders it."""
    pytest.importorskip("lm_eval", reason="lm_eval is not installed (pip install lm_eval)")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager, get_task_dict

    rows = to_hf_rows(mc_task)[:5]
    data = tmp_path / "tqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    names = harness_tasks(tmp_path / "tasks", data)
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    tasks = get_task_dict(names, manager)
    for name, key in zip(names, ("mc1_targets", "mc2_targets"), strict=True):
        task = tasks[name]
        for doc in task.validation_docs():
            assert task.doc_to_text(doc) == lm_eval_context(doc["question"])
            assert task.doc_to_choice(doc) == doc[key]["choices"]
            assert task.config.target_delimiter == TARGET_DELIMITER


# -- Dromedary protocol --------------------------------------------------------------------
class Recording(HFBackend):
    """The real tiny model, remembering what it was asked to score."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.asked: list[ScoreRequest] = []

    def score(self, requests: list[ScoreRequest]) -> list[float]:
        self.asked += requests
        return super().score(requests)


def test_dromedary_scores_every_candidate(tiny_model: Path, mc_task: Path) -> None:
    """Regression: the published scorer stepped through range(0, n_candidates, 2) over the
    (true, false) pairs, so only the first half of the candidates was ever scored."""
    backend = Recording(tiny_model, batch_size=8, dtype="float32", device="cpu")
    questions = [q for q in load_truthfulqa(mc_task)[:20] if len(q.mc1_choices) >= 5][:3]
    picks = score_dromedary(backend, questions)
    for q, p in zip(questions, picks, strict=True):
        assert len(p.scores) == len(q.mc1_choices)
        for choice in q.mc1_choices:
            ctx = dromedary_context(q.question, choice)
            assert ScoreRequest(ctx, " true") in backend.asked
            assert ScoreRequest(ctx, " false") in backend.asked
        # the last candidate's score is its own true-vs-false margin
        last = dromedary_context(q.question, q.mc1_choices[-1])
        t, f = backend.score([ScoreRequest(last, " true"), ScoreRequest(last, " false")])
        assert p.scores[-1] == pytest.approx(t - f, abs=1e-4)
        assert p.pick == max(range(len(p.scores)), key=lambda k: p.scores[k])


def test_dromedary_pick_reaches_the_second_half_and_ties_ignore_order() -> None:
    choices = ["right", "w1", "w2", "w3", "w4", "w5"]
    assert hashed_tiebreak([0.1, 0.2, 0.0, -1.0, 0.3, 0.9], "q", choices) == 5
    # A tie is broken by content, never by position (the correct answer comes first).
    tied = [1.0] * 6
    winner = choices[hashed_tiebreak(tied, "q", choices)]
    shuffled = choices[::-1]
    assert shuffled[hashed_tiebreak(tied, "q", shuffled)] == winner
    assert hashed_tiebreak(tied, "q", choices) == hashed_tiebreak(tied, "q", choices)


# -- command line and bad data -------------------------------------------------------------
def test_cli_writes_result_json(
    tiny_model: Path, mc_task: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, run_dir = tmp_path / "tqa.json", tmp_path / "run"
    argv = ["eval", "truthfulqa", "--model", str(tiny_model), "--data", str(mc_task), "--limit", "4",
            "--out", str(out), "--run-dir", str(run_dir), "--details", str(tmp_path / "d.jsonl")]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert printed == json.loads((run_dir / "eval" / "truthfulqa-lm-eval.json").read_text())
    import hashlib

    assert printed["data"] == [
        {"path": str(mc_task), "sha256": hashlib.sha256(mc_task.read_bytes()).hexdigest()}
    ]
    assert [(m["metric"], m["n"]) for m in printed["metrics"]] == [("mc1", 4), ("mc2", 4)]
    assert printed["protocol"] == "lm-eval" and printed["model"] == str(tiny_model)
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize(
    "content, expect",
    [
        (None, "file not found"),
        ('[{"question": "Q?", "mc1_targets": {"a": 1}', "invalid JSON"),
        ('[{"question": "Q?", "mc2_targets": {"a": 1}}]', "mc1_targets"),
        (
            '[{"question": "Q?", "mc1_targets": {"a": 1, "b": 1}, "mc2_targets": {"a": 1}}]',
            "exactly one",
        ),
        (
            '[{"question": "Q?", "mc1_targets": {"choices": ["a"], "labels": [1, 0]}, "mc2_targets": {"a": 1}}]',
            "differ",
        ),
        ('{"not": "a list"}', "list of JSON objects"),
    ],
)
def test_bad_data_exits_2_naming_the_file(
    tiny_model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str | None,
    expect: str,
) -> None:
    data = tmp_path / "bad.json"
    if content is not None:
        data.write_text(content, encoding="utf-8")
    assert main(["eval", "truthfulqa", "--model", str(tiny_model), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(data) in err and expect in err


def test_unknown_protocol_exits_2(
    tiny_model: Path, mc_task: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "eval",
        "truthfulqa",
        "--model",
        str(tiny_model),
        "--data",
        str(mc_task),
        "--protocol",
        "mmlu",
    ]
    assert main(argv) == 2
    assert "--protocol" in capsys.readouterr().err
