"""The ``mote`` stage end to end on the tiny model: the shipped MoTE demo config
(``assets/mote_demo.yaml``) runs AlignCoT chains -> MoTE training -> adaptive answers
through ``selfalign run``; then resume, a baseline method, and chat with steps shown.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from selfalign.cli import main
from selfalign.config import load_run_config
from selfalign.mote import is_mote_dir, load_mote
from selfalign.mote.chat import history_question, mote_reply
from selfalign.mote.train import METRICS_FILE
from selfalign.report import safety_table, write_report
from selfalign.store import JsonlWriter
from selfalign.tiny import PACKAGE_DIR

DEMO = PACKAGE_DIR / "assets" / "mote_demo.yaml"
REAL = Path(__file__).resolve().parents[1] / "configs" / "mote.yaml"
LENGTHS = {"answer_only", "analysis_answer", "guidance_answer", "full", "unfinished"}


def demo_config(tmp: Path, model: Path, queries: Path) -> Path:
    config = yaml.safe_load(DEMO.read_text())
    config["model"] = config["backend"]["model"] = str(model)
    config["stages"]["chains"]["queries"] = str(queries)
    path = tmp / "mote_demo.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def stages(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["stages"]


def answers(run_dir: Path) -> list[dict]:
    return JsonlWriter(run_dir / "mote" / "records.jsonl").read()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, shared_data: Path):
    tmp = tmp_path_factory.mktemp("mote")
    hh = shared_data / "hh_rlhf_harmless_base_test" / "harmless_base_test.jsonl"
    cfg = demo_config(tmp, tiny_model, hh)
    run_dir = tmp / "run"
    assert main(["run", str(cfg), "--out", str(run_dir)]) == 0
    return cfg, run_dir


def test_demo_config_generates_chains_trains_and_answers(demo_run) -> None:
    _, run_dir = demo_run
    chains, mote = stages(run_dir)["chains"], stages(run_dir)["mote"]
    assert chains["status"] == mote["status"] == "complete"
    by_length = chains["stats"]["chains_by_length"]
    assert sum(by_length.values()) == chains["counts"]["out"] > 0
    assert chains["counts"]["in"] == 16 == chains["counts"]["out"] + chains["counts"]["dropped"]
    assert sum(chains["stats"]["dropped_by_reason"].values()) == chains["counts"]["dropped"]
    assert sum(1 for n in by_length.values() if n) >= 2, by_length  # more than one length

    model_dir = run_dir / "mote" / "model"
    assert is_mote_dir(model_dir)
    train = mote["stats"]["train"]
    assert train["method"] == "mote" and train["steps"] == 6
    assert train["chains"] == chains["counts"]["out"]

    records = answers(run_dir)
    kept_chains = JsonlWriter(run_dir / "chains" / "records.jsonl").read()
    assert [r["question"] for r in records] == [c["question"] for c in kept_chains[:4]]
    for r in records:
        assert r["mode"] == "adaptive" and r["length"] in LENGTHS
        if r["finished"]:
            assert r["steps"][-1] == {"step": "answer", "text": r["answer"]}
    stats = mote["stats"]["answers"]
    assert stats["source"] == "training_chains" and stats["mode"] == "adaptive"
    assert sum(stats["by_length"].values()) == len(records) == 4
    print("\nchains:", by_length, chains["drop_reasons"], "| answers:", stats["by_length"])


def test_chat_shows_the_steps(demo_run) -> None:
    _, run_dir = demo_run
    model, tokenizer = load_mote(run_dir / "mote" / "model")
    history = [{"role": "user", "content": "How do I calm down before an exam?"}]
    shown = mote_reply(model, tokenizer, history, show_steps=True, max_new_tokens=24)
    plain = mote_reply(model, tokenizer, history, max_new_tokens=24)
    assert shown.startswith("[")
    forced = mote_reply(model, tokenizer, history, show_steps=True, mode="full", max_new_tokens=24)
    assert forced.startswith("[analysis]\n")
    assert plain in shown  # the steps shown end with the answer the plain reply gives
    question, system = history_question(
        [{"role": "system", "content": "Be brief."}, *history,
         {"role": "assistant", "content": "Breathe."}, {"role": "user", "content": "More?"}]
    )  # fmt: skip
    assert system == "Be brief." and question.endswith("More?") and "Breathe." in question
    with pytest.raises(ValueError):
        history_question([{"role": "assistant", "content": "Hi"}])


def test_resume_answers_without_training_again(demo_run, tmp_path: Path) -> None:
    cfg, run_dir = demo_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    metrics = copy / "mote" / "model" / METRICS_FILE
    stamp = metrics.stat().st_mtime_ns
    # As if killed after the first committed answer.
    lines = (copy / "mote" / "records.jsonl").read_text().splitlines(keepends=True)
    (copy / "mote" / "records.jsonl").write_text(lines[0])
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["stages"]["mote"]["status"] = "running"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["run", str(cfg), "--out", str(copy)]) == 0
    assert metrics.stat().st_mtime_ns == stamp  # the trained model was reused
    assert answers(copy) == answers(run_dir)
    assert stages(copy)["mote"]["stats"] == stages(run_dir)["mote"]["stats"]


def test_a_baseline_method_and_held_out_questions(demo_run, tmp_path: Path) -> None:
    cfg, run_dir = demo_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("How should I store cleaning products?\nWhat is a prime number?\n")
    config = yaml.safe_load(cfg.read_text())
    config["stages"]["mote"]["train"].update(method="lora", max_steps=2)
    config["stages"]["mote"]["answer"].update(questions=str(held_out), mode="full")
    new_cfg = tmp_path / "lora.yaml"
    new_cfg.write_text(yaml.safe_dump(config))
    assert main(["run", str(new_cfg), "--out", str(copy)]) == 0
    assert (
        json.loads((copy / "mote" / "model" / "mote_config.json").read_text())["method"] == "lora"
    )
    mote = stages(copy)["mote"]
    assert mote["stats"]["train"]["method"] == "lora"
    assert mote["stats"]["answers"]["source"] == "file:held_out.txt"
    records = answers(copy)
    assert [r["question"] for r in records] == held_out.read_text().splitlines()
    for r in records:  # forced mode: every step in order, whatever the model prefers
        assert [s["step"] for s in r["steps"]] == ["analysis", "guidance", "answer"][
            : len(r["steps"])
        ]
    # the chains were reused, not generated again
    assert stages(copy)["chains"]["timings"] == stages(run_dir)["chains"]["timings"]


def test_shipped_real_config_validates(tmp_path: Path, tiny_model: Path) -> None:
    """configs/mote.yaml with its placeholder paths pointed at real files."""
    text = REAL.read_text()
    for placeholder in ("/models/Llama-3.1-8B",):
        text = text.replace(placeholder, str(tiny_model))
    for name in ("harmless-base/train", "helpful-base/train", "harmless-base/test"):
        file = tmp_path / f"{name.replace('/', '_')}.jsonl"
        file.write_text('{"prompt": "Hello?"}\n')
        text = text.replace(f"/data/hh-rlhf/{name}.jsonl", str(file))
    cfg = tmp_path / "mote.yaml"
    cfg.write_text(text)
    run, stage_configs = load_run_config(cfg)
    assert set(stage_configs) == {"chains", "mote"}
    assert run.backend.model.startswith("vllm:")
    train = stage_configs["mote"].train
    assert (train.epochs, train.learning_rate, train.batch_size, train.mote.rank) == (
        3,
        2e-5,
        16,
        16,
    )


def test_the_eval_stage_answers_held_out_prompts_with_the_mote_model(demo_run, tmp_path) -> None:
    """Base and MoTE side by side on the held-out harmful prompts, as the mote demo does:
    the MoTE model's answer is its adaptive chain's answer step, exactly what
    ``generate_steps`` writes for the same prompts."""
    from selfalign.eval.heldout import load_heldout
    from selfalign.mote import generate_steps

    cfg, run_dir = demo_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    config = yaml.safe_load(cfg.read_text())
    config["stages"]["eval"] = {
        "models": ["base", "mote"],
        "heldout": {"kinds": ["harmful"], "max_new_tokens": 24, "icl": False},
    }
    new_cfg = tmp_path / "eval.yaml"
    new_cfg.write_text(yaml.safe_dump(config))
    assert main(["run", str(new_cfg), "--out", str(copy)]) == 0
    assert stages(copy)["mote"]["timings"] == stages(run_dir)["mote"]["timings"]  # reused

    mote = json.loads((copy / "eval" / "mote-heldout-greedy.json").read_text())
    base = json.loads((copy / "eval" / "base-heldout-greedy.json").read_text())
    prompts = [p for p in load_heldout() if p["kind"] == "harmful"]
    assert (
        [a["id"] for a in mote["answers"]]
        == [a["id"] for a in base["answers"]]
        == [p["id"] for p in prompts]
    )
    model, tokenizer = load_mote(copy / "mote" / "model")
    want = generate_steps(model, tokenizer, [p["prompt"] for p in prompts], mode="adaptive",
                          max_new_tokens=24, temperature=0.0)  # fmt: skip
    for row, out in zip(mote["answers"], want, strict=True):
        assert (row["answer"], row["steps"], row["self_stop"]) == (
            (out.answer or "").strip(), out.steps, out.finished,
        )  # fmt: skip
    assert {m["metric"] for m in mote["metrics"]} >= {"self_stop_rate", "refusal_rate_harmful"}
    page = write_report(copy).read_text()
    assert "Reasoning chains and MoTE" in page and "chains by length" in page
    assert "<th>mote</th>" in page and "wrote " in page  # the side by side shows the steps


def test_the_mote_demo_config_validates(tmp_path: Path, tiny_model: Path) -> None:
    from selfalign.demo import mote_demo_config

    config = mote_demo_config(seed=0, tiny=False, model=tiny_model)
    path = tmp_path / "mote.yaml"
    path.write_text(yaml.safe_dump(config))
    _, stage_configs = load_run_config(path)
    assert set(stage_configs) == {"chains", "mote", "eval"}
    assert stage_configs["chains"].check == "likelihood"
    assert stage_configs["chains"].check_temperature == 0  # greedy: no coin flip
    assert stage_configs["eval"].models == ["base", "mote"]


def copy_with_harmful_prompt(run_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the demo run, and a one-prompt file in HH-RLHF's harmful layout."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    prompts = tmp_path / "harmless-base" / "test.jsonl"
    prompts.parent.mkdir()
    prompts.write_text(
        json.dumps({"chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help."})
        + "\n"
    )
    return copy, prompts


def test_the_eval_stage_judges_the_mote_models_safety_answers(demo_run, tmp_path) -> None:
    """The safety block on the MoTE model: its replies are its adaptive chains' answer
    steps, judged per prompt file (the tiny model judges; its verdicts are noise)."""
    from selfalign.eval.safety import load_prompts
    from selfalign.mote import generate_steps

    cfg, run_dir = demo_run
    copy, prompts = copy_with_harmful_prompt(run_dir, tmp_path)
    config = yaml.safe_load(cfg.read_text())
    config["stages"]["eval"] = {
        "models": ["mote"],
        "safety": {"prompts": [str(prompts)], "max_new_tokens": 24,
                   "judge": {"model": config["model"], "dtype": "float32"}},
    }  # fmt: skip
    new_cfg = tmp_path / "eval.yaml"
    new_cfg.write_text(yaml.safe_dump(config))
    assert main(["run", str(new_cfg), "--out", str(copy)]) == 0

    result = json.loads((copy / "eval" / "mote-safety-test.json").read_text())
    assert result["model"] == "mote" and result["details"]["files"]["test"]["prompts"] == {
        "harmful": 1
    }
    kept = JsonlWriter(copy / "eval" / "mote-safety-test.records.jsonl").read()
    model, tokenizer = load_mote(copy / "mote" / "model")
    want = generate_steps(model, tokenizer, [p.prompt for p in load_prompts(prompts)],
                          mode="adaptive", max_new_tokens=24, temperature=0.0)  # fmt: skip
    assert [r["reply"] for r in kept] == [(want[0].answer or "").strip()]


def test_launch_block_trains_under_accelerate_and_refuses_fsdp(
    demo_run, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``launch:`` as the SFT stages have it: FSDP is refused at the start with one line;
    DDP over two CPU processes writes the same kind of MoTE directory."""
    cfg, run_dir = demo_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    accelerate = REAL.parent / "accelerate"
    config = yaml.safe_load(cfg.read_text())
    config["stages"]["mote"]["train"].update(max_steps=2)
    config["stages"]["mote"]["launch"] = {
        "num_processes": 2, "accelerate_config": str(accelerate / "fsdp.yaml")
    }  # fmt: skip
    new_cfg = tmp_path / "launch.yaml"
    new_cfg.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["run", str(new_cfg), "--out", str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("FSDP" in line and "ddp.yaml" in line for line in err), err

    config["stages"]["mote"]["launch"]["accelerate_config"] = str(accelerate / "ddp.yaml")
    new_cfg.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(["run", str(new_cfg), "--out", str(copy)]) == 0
    model_dir = copy / "mote" / "model"
    assert is_mote_dir(model_dir) and not (model_dir / "launch").exists()
    train = stages(copy)["mote"]["stats"]["train"]
    assert train["method"] == "mote" and train["steps"] == 2
    metrics = json.loads((model_dir / METRICS_FILE).read_text())
    assert metrics["processes"] == 2
    assert len(answers(copy)) == len(answers(run_dir))  # then it answered, in this process


def test_rows_train_every_method_and_the_eval_stage_scores_each(demo_run, tmp_path, capsys) -> None:
    """``rows``: each method trained on the same chains into ``mote/rows/{method}``, answering
    the same questions; ``mote:{method}`` in the eval stage answers with that row's model and
    gets its own safety result; the report's safety table has one row per model."""
    from selfalign.eval.safety import load_prompts
    from selfalign.mote import generate_steps
    from selfalign.store import record_id

    cfg, run_dir = demo_run
    copy, prompts = copy_with_harmful_prompt(run_dir, tmp_path)
    config = yaml.safe_load(cfg.read_text())
    mote = config["stages"]["mote"]
    mote["train"].update(max_steps=2)
    mote["rows"] = ["lora", "mote_no_both"]
    mote["answer"].update(limit=2)
    config["stages"]["eval"] = {
        "models": ["mote", "mote:mote_no_both", "mote:lora"],  # not in file-name order
        "safety": {"prompts": [str(prompts)], "max_new_tokens": 16, "judge_mode": "likelihood",
                   "judge": {"model": config["model"], "dtype": "float32"}},
    }  # fmt: skip
    new_cfg = tmp_path / "rows.yaml"
    new_cfg.write_text(yaml.safe_dump(config))
    assert main(["run", str(new_cfg), "--out", str(copy)]) == 0

    entry = stages(copy)["mote"]
    assert entry["artifact"] == "mote/model"
    assert entry["artifacts"] == ["mote/rows/lora", "mote/rows/mote_no_both"]
    for method, folder in [("mote", "model"), ("lora", "rows/lora"),
                           ("mote_no_both", "rows/mote_no_both")]:  # fmt: skip
        model_dir = copy / "mote" / folder
        assert is_mote_dir(model_dir) and (model_dir / "README.md").is_file()
        assert json.loads((model_dir / METRICS_FILE).read_text())["method"] == method
    assert entry["stats"]["train"]["method"] == "mote"
    rows = entry["stats"]["rows"]
    assert {m: r["train"]["method"] for m, r in rows.items()} == {
        "lora": "lora", "mote_no_both": "mote_no_both"
    }  # fmt: skip
    assert all(sum(r["answers"]["by_length"].values()) == 2 for r in rows.values())

    records = answers(copy)
    by_method = {
        m: [r for r in records if r["method"] == m] for m in ("mote", "lora", "mote_no_both")
    }
    questions = [r["question"] for r in by_method["mote"]]
    assert all([r["question"] for r in v] == questions for v in by_method.values())
    # the main method's ids are those of a stage without rows; a row's carry its method
    assert [r["id"] for r in by_method["mote"]] == [record_id("mote-answer", q) for q in questions]
    assert [r["id"] for r in by_method["lora"]] == [
        record_id("mote-answer", "lora", q) for q in questions
    ]

    # each mote:{method} answered with its own model
    asked = [p.prompt for p in load_prompts(prompts)]
    for model, folder in [("mote", "model"), ("mote:lora", "rows/lora")]:
        result = json.loads((copy / "eval" / f"{model}-safety-test.json").read_text())
        assert result["model"] == model and result["protocol"] == "judge-v2-likelihood"
        assert result["details"]["unreadable_judgments"] == 0
        kept = JsonlWriter(copy / "eval" / f"{model}-safety-test.records.jsonl").read()
        row_model, tokenizer = load_mote(copy / "mote" / folder)
        want = generate_steps(row_model, tokenizer, asked, mode="adaptive", max_new_tokens=16,
                              temperature=0.0)  # fmt: skip
        assert [r["reply"] for r in kept] == [(want[0].answer or "").strip()]
    page = write_report(copy).read_text()
    assert "Safety: Help / Harm / Harm-Help / XSTest" in page
    _, table = safety_table(copy)
    assert [row[0] for row in table] == ["mote", "mote:mote_no_both", "mote:lora"]

    # killed before its last row was built: a rerun trains that row only
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["stages"]["mote"].update(status="running", artifacts=["mote/rows/lora"])
    (copy / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(copy / "mote" / "rows" / "mote_no_both")
    kept = [r for r in answers(copy) if r["method"] != "mote_no_both"]
    (copy / "mote" / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    before = {f: (copy / "mote" / f / METRICS_FILE).stat().st_mtime_ns
              for f in ("model", "rows/lora")}  # fmt: skip
    assert main(["run", str(new_cfg), "--out", str(copy), "--only", "mote"]) == 0
    assert before == {f: (copy / "mote" / f / METRICS_FILE).stat().st_mtime_ns for f in before}
    assert stages(copy)["mote"]["artifacts"] == ["mote/rows/lora", "mote/rows/mote_no_both"]
    assert sorted(r["id"] for r in answers(copy)) == sorted(r["id"] for r in records)

    # a model no stage trains is refused when the config loads
    config["stages"]["eval"]["models"].append("mote:mixlora")
    new_cfg.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["run", str(new_cfg), "--out", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stages.eval.models" in err and "mixlora" in err
