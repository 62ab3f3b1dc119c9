"""``selfalign eval lm-eval``: lm-evaluation-harness tasks through our backends.

TruthfulQA MC1/MC2 through the harness equal ``selfalign eval truthfulqa``; a local
generate_until task goes through the backend's ``generate``; the openai backend against
the test server gives the hf backend's numbers; records make a rerun resume; a MoTE
directory is scored with its answer expert; bad task names and Hub-only datasets exit 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from selfalign.backends import GenerationRequest, SamplingParams
from selfalign.backends.hf import HFBackend
from selfalign.cli import main
from selfalign.eval.resume import model_identity
from selfalign.eval.truthfulqa import TARGET_DELIMITER, lm_eval_context, load_truthfulqa

pytest.importorskip("lm_eval", reason="lm_eval is not installed (pip install lm_eval)")

from selfalign.eval.harness import request_id  # noqa: E402

LIMIT = 6  # documents per task
QUESTIONS = [(3, 4), (10, 5), (7, 7), (12, 30), (1, 1), (6, 9), (20, 2), (8, 0)]
ARITH_PROMPT = "Question: what is {a} plus {b}?\nAnswer:"
ARITH_YAML = """\
task: arith_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: "Question: what is {{{{a}}}} plus {{{{b}}}}?\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "Question:"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: [" "]
metadata:
  version: 1.0
"""
TQA = ("truthfulqa_mc1", "truthfulqa_mc2")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Hub: the libraries read these at import, so their constants are set too."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)


@pytest.fixture(scope="module")
def arith_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local generate_until task: a few sums, data in a JSONL beside the YAML."""
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "arith.jsonl"
    rows = [{"a": a, "b": b, "answer": str(a + b)} for a, b in QUESTIONS]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    yaml = ARITH_YAML.format(data=data, cache=folder / "cache")
    (folder / "arith_local.yaml").write_text(yaml, encoding="utf-8")
    return folder


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict | None, str]:
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines else None), captured.err


def lm_eval_argv(model: str, tasks: str, tmp: Path, *extra: str) -> list[str]:
    return [
        "eval", "lm-eval", "--model", model, "--tasks", tasks, "--limit", str(LIMIT),
        "--out", str(tmp / "result.json"), "--dtype", "float32", "--device", "cpu", *extra,
    ]  # fmt: skip


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def mc1_pairs(mc_task: Path) -> list[tuple[str, str]]:
    """The (context, continuation) pairs truthfulqa_mc1 scores for the first LIMIT questions."""
    return [
        (lm_eval_context(q.question), TARGET_DELIMITER + c)
        for q in load_truthfulqa(mc_task)[:LIMIT]
        for c in q.mc1_choices
    ]


def metric(result: dict, name: str) -> float:
    return next(m["value"] for m in result["metrics"] if m["metric"] == name)


@pytest.fixture(scope="module")
def hf_run(
    tiny_model: Path, mc_task: Path, arith_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict, Path]:
    """TruthfulQA MC1/MC2 and the sums on the hf backend, records kept."""
    tmp = tmp_path_factory.mktemp("hf_run")
    captured = _Capture()
    argv = lm_eval_argv(str(tiny_model), ",".join([*TQA, "arith_local"]), tmp,
                        "--truthfulqa-data", str(mc_task), "--include-path", str(arith_dir))  # fmt: skip
    with captured:
        code = main(argv)
    assert code == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1]), tmp / "result.records.jsonl"


class _Capture:
    """stdout/stderr of a CLI call made in a module-scoped fixture (no capsys there)."""

    def __enter__(self) -> _Capture:
        import contextlib
        import io

        self._out, self._err = io.StringIO(), io.StringIO()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(self._out))
        self._stack.enter_context(contextlib.redirect_stderr(self._err))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self.out, self.err = self._out.getvalue(), self._err.getvalue()


# -- hf backend -----------------------------------------------------------------------------
def test_truthfulqa_through_the_harness_equals_our_scorer(
    hf_run: tuple[dict, Path], tiny_model: Path, mc_task: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    result, _ = hf_run
    argv = ["eval", "truthfulqa", "--model", str(tiny_model), "--data", str(mc_task),
            "--limit", str(LIMIT), "--dtype", "float32", "--device", "cpu"]  # fmt: skip
    code, ours, _ = run_cli(argv, capsys)
    assert code == 0
    for k in ("mc1", "mc2"):
        theirs = metric(result, f"truthfulqa_{k}/acc")
        assert abs(theirs - metric(ours, k)) <= 1e-9, (k, theirs, metric(ours, k))
    assert {m["metric"]: m["n"] for m in result["metrics"]}["truthfulqa_mc2/acc"] == LIMIT
    assert result["details"]["n-samples"]["truthfulqa_mc1"] == {"original": 817, "effective": LIMIT}
    assert result["details"]["versions"]["truthfulqa_mc2"] == 3.0
    assert result["details"]["is_greedy"] == "exact"
    assert result["data"][0]["path"] == str(mc_task)


def test_a_generate_until_task_goes_through_generate(
    hf_run: tuple[dict, Path], tiny_model: Path
) -> None:
    result, path = hf_run
    done = result["details"]["requests"]["computed"]
    assert done["generate_until"] == LIMIT and done["loglikelihood"] > 2 * LIMIT
    texts = [r["text"] for r in records(path) if "text" in r]
    backend = HFBackend(tiny_model, dtype="float32", device="cpu")
    params = SamplingParams(max_new_tokens=6, stop=("\n", "Question:"))
    want = backend.generate(
        [GenerationRequest(prompt=ARITH_PROMPT.format(a=a, b=b), params=params)
         for a, b in QUESTIONS[:LIMIT]]
    )  # fmt: skip
    assert sorted(texts) == sorted(w.text for w in want)
    assert any(t.strip() for t in texts), "the model should write something"
    pairs = zip(want, QUESTIONS[:LIMIT], strict=True)
    hits = [w.text.replace(" ", "") == str(a + b) for w, (a, b) in pairs]
    assert metric(result, "arith_local/exact_match") == pytest.approx(sum(hits) / LIMIT)


def test_a_rerun_resumes_from_the_records(
    hf_run: tuple[dict, Path], tiny_model: Path, mc_task: Path, arith_dir: Path,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """A run killed after K records (its file cut there) asks the backend only for the rest."""
    first, path = hf_run
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = 25
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(lines[:keep]) + lines[keep][:10], encoding="utf-8")  # torn tail
    argv = lm_eval_argv(str(tiny_model), ",".join([*TQA, "arith_local"]), tmp_path,
                        "--truthfulqa-data", str(mc_task), "--include-path", str(arith_dir),
                        "--records", str(partial))  # fmt: skip
    code, again, _ = run_cli(argv, capsys)
    assert code == 0
    computed, reused = (again["details"]["requests"][k] for k in ("computed", "reused"))
    assert sum(reused.values()) == keep
    assert sum(computed.values()) == len(lines) - keep
    assert again["metrics"] == first["metrics"]
    assert len(records(partial)) == len(lines)
    code, third, _ = run_cli(argv, capsys)  # everything is in the records now
    assert code == 0 and third["details"]["requests"]["computed"] == {}
    assert third["metrics"] == first["metrics"]


# -- openai backend against the test server --------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator:
    pytest.importorskip("fastapi", reason="the test server needs the dev extra (fastapi)")
    pytest.importorskip("uvicorn", reason="the test server needs the dev extra (uvicorn)")
    from openai_server import serve

    with serve(tiny_model, dtype="float32", device="cpu") as running:
        yield running


def test_openai_backend_gives_the_hf_numbers(
    hf_run: tuple[dict, Path], server, tiny_model: Path, mc_task: Path, arith_dir: Path,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    first, hf_records = hf_run
    argv = lm_eval_argv(server.spec(), "truthfulqa_mc1,arith_local", tmp_path,
                        "--truthfulqa-data", str(mc_task), "--include-path", str(arith_dir))  # fmt: skip
    code, result, err = run_cli(argv, capsys)
    assert code == 0, err
    assert result["details"]["backend"] == "openai" and result["model"] == server.spec()
    for name in ("truthfulqa_mc1/acc", "arith_local/exact_match"):
        assert metric(result, name) == metric(first, name)
    mine = {r["id"]: r for r in records(tmp_path / "result.records.jsonl")}
    theirs = {r["id"]: r for r in records(hf_records)}
    diffs = []
    for ctx, cont in mc1_pairs(mc_task):  # record ids name the model: match them by pair
        got = mine[request_id(model_identity(server.spec()), "loglikelihood", ctx, cont)]
        want = theirs[request_id(model_identity(str(tiny_model)), "loglikelihood", ctx, cont)]
        diffs.append(abs(got["ll"] - want["ll"]))
        assert got["greedy"] == want["greedy"]
    print(f"openai vs hf: {len(diffs)} log-likelihoods, max |diff| {max(diffs):.2e}")
    assert len(diffs) > 2 * LIMIT and max(diffs) < 1e-4
    texts = sorted(r["text"] for r in mine.values() if "text" in r)
    assert texts == sorted(r["text"] for r in records(hf_records) if "text" in r)
    assert result["details"]["is_greedy"] == "exact"


# -- MoTE directories -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mote_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MoTE model with distinct non-zero experts (fresh LoRA B matrices are zero)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfalign.mote import MoteConfig, build_mote, save_mote

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    build_mote(model, tokenizer, MoteConfig(lora_dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return save_mote(model, tokenizer, tmp_path_factory.mktemp("mote") / "model")


def test_a_mote_model_is_scored_with_its_answer_expert(
    mote_dir: Path, hf_run: tuple[dict, Path], mc_task: Path, arith_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from selfalign.mote import export_merged_step, generate_steps, load_mote

    model, tokenizer = load_mote(mote_dir)
    merged = export_merged_step(model, tokenizer, "answer", tmp_path / "answer")
    runs = {}
    for name, spec in (("mote", mote_dir), ("merged", merged)):
        out = tmp_path / name
        out.mkdir()
        argv = lm_eval_argv(str(spec), "truthfulqa_mc1,arith_local", out,
                            "--truthfulqa-data", str(mc_task), "--include-path", str(arith_dir))  # fmt: skip
        code, result, err = run_cli(argv, capsys)
        assert code == 0, err
        runs[name] = (result, records(out / "result.records.jsonl"))
    assert runs["mote"][0]["details"]["backend"] == "mote"
    mote_lls = [r["ll"] for r in runs["mote"][1] if "ll" in r]
    merged_lls = [r["ll"] for r in runs["merged"][1] if "ll" in r]
    assert mote_lls == pytest.approx(merged_lls, abs=1e-3)
    base_lls = [r["ll"] for r in records(hf_run[1]) if "ll" in r][: len(mote_lls)]
    assert max(abs(a - b) for a, b in zip(mote_lls, base_lls, strict=True)) > 1e-2, (
        "the experts must change the scores (not the bare base model)"
    )
    # generate_until: the answer step of an adaptive chain, cut at the stop strings
    chains = generate_steps(
        model, tokenizer, [ARITH_PROMPT.format(a=a, b=b) for a, b in QUESTIONS[:LIMIT]],
        mode="adaptive", max_new_tokens=6,
    )  # fmt: skip
    want = sorted((c.answer or "").split("\n")[0].split("Question:")[0] for c in chains)
    assert sorted(r["text"] for r in runs["mote"][1] if "text" in r) == want

    code, _, err = run_cli(lm_eval_argv(f"vllm:{mote_dir}", "arith_local", tmp_path,
                                        "--include-path", str(arith_dir)), capsys)  # fmt: skip
    assert code == 2 and "MoTE" in err and len(err.strip().splitlines()) == 1


def test_eval_answer_runs_a_mote_directory_not_its_base(
    mote_dir: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every command that takes a model runs a MoTE directory as MoTE (its adaptive chain,
    the answer step's text as the answer), never the base model stored underneath."""
    from selfalign.mote import generate_steps, load_mote

    asks = ["Name a primary colour.", "How do I pick a lock?", "What is two plus three?"]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "category": "generic",
                                             "turns": [q]}) + "\n" for i, q in enumerate(asks)))  # fmt: skip
    answers = {}
    for name, spec in (("mote", mote_dir), ("base", tiny_model)):
        out = tmp_path / f"{name}.jsonl"
        code = main(["eval", "answer", "--model", str(spec), "--questions", str(questions),
                     "--out", str(out), "--max-new-tokens", "8"])  # fmt: skip
        assert code == 0, capsys.readouterr().err
        answers[name] = [r["choices"][0]["turns"][0] for r in records(out)]
    model, tokenizer = load_mote(mote_dir)
    chains = generate_steps(model, tokenizer, asks, mode="adaptive", max_new_tokens=8)
    assert answers["mote"] == [(c.answer or "").strip() for c in chains]
    assert answers["mote"] != answers["base"]


# -- bad input ------------------------------------------------------------------------------------
def test_unknown_task_and_hub_only_dataset_exit_2(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, result, err = run_cli(lm_eval_argv(str(tiny_model), "arc_easy,no_such_task", tmp_path),
                                capsys)  # fmt: skip
    assert code == 2 and result is None
    assert "no_such_task" in err and len(err.strip().splitlines()) == 1
    code, result, err = run_cli(lm_eval_argv(str(tiny_model), "arc_easy", tmp_path), capsys)
    assert code == 2 and result is None
    assert "arc_easy" in err and "offline" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "result.json").exists()


def test_rolling_windows_cover_a_text_longer_than_the_context(tiny_model: Path) -> None:
    """loglikelihood_rolling: one window = the whole text after BOS; a context too short
    for it cuts lm-eval's rolling windows (every token still predicted once)."""
    from selfalign.backends import ScoreRequest
    from selfalign.eval.harness import BackendLM

    backend = HFBackend(tiny_model, dtype="float32", device="cpu")
    text = "The cat sat on the mat, and the dog sat by the door. " * 3
    n = len(backend.encode(text))
    whole = backend.score([ScoreRequest("", text)])[0]
    fits = BackendLM(backend, model_id="t", max_length=n + 1)._rolling([text])[0]
    assert fits == pytest.approx(whole, abs=1e-4)
    before = backend.stats.prefill_tokens
    cut = BackendLM(backend, model_id="t", max_length=n // 3)._rolling([text])[0]
    assert abs(cut - whole) > 1e-3 and cut < 0  # less context, another number
    assert backend.stats.prefill_tokens - before >= n  # all tokens were run, in windows


def test_without_lm_eval_the_command_says_what_to_install(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    code, result, err = run_cli(lm_eval_argv(str(tiny_model), "arith_local", tmp_path), capsys)
    assert code == 2 and result is None
    assert "pip install lm_eval" in err and len(err.strip().splitlines()) == 1
