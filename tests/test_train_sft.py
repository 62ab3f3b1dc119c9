"""Supervised fine-tuning (``selfalign.train``) and the demo model's pre-training, run for
real on the tiny model: masking, resume, the output model dir, accelerate launch."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from selfalign.chat_format import ASSISTANT_TAG, chat_template, render_prompt
from selfalign.cli import main
from selfalign.errors import InputError
from selfalign.train import TrainConfig, build_trainer, parse_train_config, train_sft
from selfalign.train.data import read_examples
from selfalign.train.sft import plan_training

REPO = Path(__file__).resolve().parents[1]
# quotes and a line break: the saved chat template must carry it byte for byte
SYSTEM = "You are \"Tester\", an AI assistant.\nYou are helpful, honest and careful; you say 'I don't know' when unsure."
EXAMPLES = [
    {"prompt": "What is 2 plus 3?", "answer": "2 plus 3 is 5."},
    {"prompt": "Name a primary colour.", "answer": "Red is a primary colour."},
    {"prompt": "Write a tiny Python function.", "answer": "def one():\n    return 1"},
    {"prompt": "Say hello in French.", "answer": "Bonjour ! Ça va ?"},
    {"prompt": "List two fruits.", "answer": "1. Apple\n2. Pear"},
    {"prompt": "Who will win tomorrow's match?", "answer": "I cannot know a future result."},
    {"prompt": "Is water wet?", "answer": "Water makes other things wet."},
    {"prompt": "What day follows Monday?", "answer": "Tuesday follows Monday."},
]
# a handful of steps, checkpoints every 2, dropout on: resume must restore the RNG too
FAST = {
    "max_steps": 6,
    "warmup_ratio": 0.5,  # 3 of the 6 steps
    "per_device_batch_size": 2,
    "global_batch_size": 2,
    "save_steps": 2,
    "gradient_checkpointing": False,
}


def conversation(record: dict, system: str = SYSTEM) -> tuple[list[dict], list[dict]]:
    prompt = [{"role": "system", "content": system}, {"role": "user", "content": record["prompt"]}]
    return prompt, [{"role": "assistant", "content": record["answer"]}]


def template_ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def finished_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted LoRA training with merged weights, shared by several tests."""
    out = tmp_path_factory.mktemp("sft") / "model"
    return train_sft(EXAMPLES, tiny_model, out, TrainConfig(**FAST, merge=True), system_text=SYSTEM)


# --- config -------------------------------------------------------------------------


def test_config_defaults_are_the_paper_schedule_and_errors_name_the_field():
    cfg = TrainConfig()
    assert (cfg.method, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == ("lora", 16, 16, 0.05)
    assert cfg.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (cfg.learning_rate, cfg.warmup_ratio, cfg.lr_scheduler) == (4e-4, 0.2, "linear")
    assert (cfg.epochs, cfg.max_length, cfg.optimizer) == (1.0, 512, "adamw_torch")
    # the paper's global batch of 768 by default: 4 per device, accumulation derived
    assert (cfg.global_batch_size, cfg.per_device_batch_size) == (768, 4)
    assert cfg.accumulation_steps(world_size=1) == 192
    assert cfg.accumulation_steps(world_size=8) == 24
    with pytest.raises(InputError, match="lora_rank"):
        parse_train_config({"lora_rank": 8}, file="run.yaml")
    with pytest.raises(InputError, match="method"):
        parse_train_config({"method": "dora"})
    paper = parse_train_config({"global_batch_size": 768, "per_device_batch_size": 4})
    assert paper.accumulation_steps(world_size=8) == 24
    with pytest.raises(InputError, match="global_batch_size"):
        paper.accumulation_steps(world_size=5)
    with pytest.raises(InputError, match="global_batch_size 768 is not a multiple of"):
        parse_train_config({"per_device_batch_size": 5})


def test_a_fixed_count_given_alone_replaces_the_derived_default():
    fixed = parse_train_config({"warmup_steps": 30, "gradient_accumulation_steps": 8})
    assert (fixed.warmup_ratio, fixed.warmup_steps) == (None, 30)
    assert fixed.global_batch_size is None and fixed.accumulation_steps(world_size=2) == 8
    both = parse_train_config({"warmup_steps": 30, "warmup_ratio": 0.1, "global_batch_size": 64,
                               "gradient_accumulation_steps": 8})  # fmt: skip
    assert (both.warmup_ratio, both.accumulation_steps(world_size=1)) == (0.1, 16)
    # what a stage writes for accelerate launch reads back as the same config
    for cfg in (TrainConfig(), fixed, both):
        assert parse_train_config(cfg.model_dump(mode="json")) == cfg


def test_examples_file_errors_point_at_the_line(tmp_path: Path):
    path = tmp_path / "ex.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n\n{"prompt": "c"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"ex.jsonl:3: answer"):
        read_examples(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_qlora_on_cpu_is_a_clear_input_error(tiny_model: Path, tmp_path: Path):
    with pytest.raises(InputError, match="qlora.*CUDA"):
        train_sft(EXAMPLES, tiny_model, tmp_path, TrainConfig(method="qlora"), system_text=SYSTEM)
    assert not any(tmp_path.iterdir())  # refused before anything was loaded or written


# --- loss masking -------------------------------------------------------------------


def test_labels_mask_exactly_the_prompt_span(tiny_model: Path, tmp_path: Path):
    long_answer = {"prompt": "Count.", "answer": " ".join(f"n{i}" for i in range(200))}
    long_prompt = {"prompt": "word " * 300, "answer": "Too long to learn from."}
    examples = [*EXAMPLES, long_answer, long_prompt]
    cfg = TrainConfig(**FAST, max_length=96)
    trainer = build_trainer(examples, tiny_model, tmp_path, cfg, system_text=SYSTEM)
    tok = trainer.processing_class
    rows = list(trainer.train_dataset)
    assert len(rows) == len(examples) - 1  # the prompt alone exceeds max_length: no answer left
    plan = plan_training(examples, tok, cfg, SYSTEM)
    assert (plan.examples, plan.dropped, plan.truncated) == (len(rows), 1, 1)  # long_answer

    for record, row in zip(examples, rows, strict=False):
        prompt, completion = conversation(record)
        prompt_ids = template_ids(tok, prompt, add_generation_prompt=True)
        full_ids = template_ids(tok, prompt + completion)
        ids, labels = row["input_ids"], row["labels"]
        n = len(prompt_ids)
        assert ids == full_ids[: cfg.max_length]
        assert ids[:n] == prompt_ids  # the template's prompt boundary is a token boundary
        assert tok.decode(ids[:n]).endswith(ASSISTANT_TAG + "\n")
        assert labels[:n] == [-100] * n  # system, user turn and assistant tag: no loss
        assert labels[n:] == ids[n:]  # every answer token (and the end-of-turn) is trained
        if record is not long_answer:
            assert ids[-1] == tok.eos_token_id
            assert tok.decode(ids[n:], skip_special_tokens=True) == record["answer"]

    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()  # padding: no loss


# --- resume -------------------------------------------------------------------------


class Killed(Exception):
    pass


class KillAtStep(TrainerCallback):
    """Dies like a killed job: mid-training, after the last checkpoint, nothing saved."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(f"killed at step {state.global_step}")


def adapter_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "adapter_model.safetensors")


def test_killed_training_resumes_to_the_uninterrupted_result(
    tiny_model: Path, tmp_path: Path, finished_run
):
    out = tmp_path / "model"
    cfg = TrainConfig(**FAST)  # merge is not part of what training computes
    with pytest.raises(Killed):
        train_sft(EXAMPLES, tiny_model, out, cfg, system_text=SYSTEM, callbacks=[KillAtStep(5)])
    assert (out / "checkpoints" / "checkpoint-4").is_dir()
    assert not (out / "adapter_model.safetensors").exists()

    resumed = train_sft(EXAMPLES, tiny_model, out, cfg, system_text=SYSTEM)
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith("checkpoint-4")
    assert resumed.global_step == finished_run.global_step == 6
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    want = [h["loss"] for h in finished_run.history]
    assert [h["loss"] for h in resumed.history] == pytest.approx(want, rel=1e-5)
    assert want[0] != pytest.approx(want[-1], rel=1e-4)  # the weights did move
    expected = adapter_weights(finished_run.model_dir)
    got = adapter_weights(out)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    assert not (out / "checkpoints").exists()  # removed once the model is saved


def test_checkpoints_of_other_inputs_are_not_resumed(tiny_model: Path, tmp_path: Path):
    out = tmp_path / "model"
    cfg = TrainConfig(**{**FAST, "max_steps": 3})
    with pytest.raises(Killed):
        train_sft(EXAMPLES, tiny_model, out, cfg, system_text=SYSTEM, callbacks=[KillAtStep(3)])
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    result = train_sft(EXAMPLES[:6], tiny_model, out, cfg, system_text=SYSTEM)
    assert result.resumed_from is None and result.global_step == 3


# --- output model dir ---------------------------------------------------------------


def test_output_dir_round_trips_template_adapter_and_merged_weights(
    finished_run, tiny_model: Path, tmp_path: Path
):
    out = finished_run.model_dir
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    log = json.loads((out / "train_log.json").read_text())
    assert [h["step"] for h in log["history"]] == [1, 2, 3, 4, 5, 6]
    assert log["config"]["lora_r"] == 16 and log["examples"] == len(EXAMPLES)

    # the saved tokenizer renders conversations exactly as training tokenised them
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.chat_template == chat_template(SYSTEM)
    trainer = build_trainer(EXAMPLES, tiny_model, tmp_path, TrainConfig(**FAST), system_text=SYSTEM)
    for record, row in zip(EXAMPLES, trainer.train_dataset, strict=True):
        prompt, completion = conversation(record)
        assert template_ids(saved, prompt + completion) == row["input_ids"]
    del trainer

    # merged weights: a plain transformers model, equal to base + adapter
    merged_dir = finished_run.merged_dir
    assert merged_dir == out / "merged" and not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert AutoTokenizer.from_pretrained(merged_dir).chat_template == chat_template(SYSTEM)

    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    base_logits = base(**saved("Hello there", return_tensors="pt")).logits
    with_adapter = PeftModel.from_pretrained(base, out).eval()
    inputs = saved(render_prompt(SYSTEM, "What is 2 plus 3?"), return_tensors="pt")
    with torch.no_grad():
        want = with_adapter(**inputs).logits
        got = merged(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(
        base_logits, merged(**saved("Hello there", return_tensors="pt")).logits
    )


def test_training_format_matches_render_prompt(finished_run):
    """What the model is trained on is what generation stages prompt it with."""
    saved = AutoTokenizer.from_pretrained(finished_run.model_dir)
    prompt, _ = conversation(EXAMPLES[0])
    text = saved.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert text == saved.bos_token + render_prompt(SYSTEM, EXAMPLES[0]["prompt"])


def test_saved_template_supplies_the_training_system_text(finished_run, tiny_model, tmp_path):
    """`vllm serve` and plain apply_chat_template send no system message: the model must
    still get the prompt it was trained on."""
    for model_dir in (finished_run.model_dir, finished_run.merged_dir):
        saved = AutoTokenizer.from_pretrained(model_dir)
        record = EXAMPLES[3]
        user = [{"role": "user", "content": record["prompt"]}]
        text = saved.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        assert text == saved.bos_token + render_prompt(SYSTEM, record["prompt"])
        # ... token for token the prompt span of that training example
        trainer = build_trainer(EXAMPLES, tiny_model, tmp_path, TrainConfig(**FAST),
                                system_text=SYSTEM)  # fmt: skip
        row = trainer.train_dataset[3]
        n = row["labels"].count(-100)
        assert template_ids(saved, user, add_generation_prompt=True) == row["input_ids"][:n]
        # a conversation that brings its own system text keeps it
        own = [{"role": "system", "content": "Be brief."}, *user]
        text = saved.apply_chat_template(own, tokenize=False, add_generation_prompt=True)
        assert text == saved.bos_token + render_prompt("Be brief.", record["prompt"])
        del trainer


def test_warmup_ratio_reaches_the_scheduler(finished_run):
    """warmup_ratio 0.5 of 6 steps: the rate climbs for 3 steps, then decays linearly."""
    assert finished_run.warmup_steps == 3
    lrs = [h["learning_rate"] for h in finished_run.history]  # the rate each step used
    assert lrs == pytest.approx([4e-4 * k / 3 for k in (0, 1, 2, 3, 2, 1)])


def test_small_data_at_the_default_batch_warns_and_counts_truncation(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    from selfalign.stages.training import training_summary

    cfg = TrainConfig(max_length=62, gradient_checkpointing=False)  # default global batch 768
    with caplog.at_level("WARNING", logger="selfalign.train.sft"):
        result = train_sft(EXAMPLES, tiny_model, tmp_path / "m", cfg, system_text=SYSTEM)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    longer = sum(len(template_ids(tok, sum(conversation(r), []))) > 62 for r in EXAMPLES)
    assert 0 < longer < len(EXAMPLES)
    # 8 examples in 2 micro-batches of 4, then one optimizer step for the global batch
    assert (result.optimizer_steps, result.global_step, result.global_batch) == (1, 1, 768)
    assert (result.truncated, result.dropped, result.warmup_steps) == (longer, 0, 1)
    log = json.loads((tmp_path / "m" / "train_log.json").read_text())
    assert (log["optimizer_steps"], log["truncated"]) == (1, longer)
    assert any("only 1 optimizer steps" in w for w in log["warnings"])
    assert any(f"{longer} of 8 examples are longer than max_length 62" in w
               for w in log["warnings"])  # fmt: skip
    assert [r.getMessage() for r in caplog.records] == log["warnings"]
    summary = training_summary(tmp_path / "m")
    assert summary["truncated"] == longer and summary["warnings"] == log["warnings"]
    assert summary["optimizer_steps"] == 1

    with pytest.raises(InputError, match="max_length 40"):  # every prompt fills it
        train_sft(EXAMPLES, tiny_model, tmp_path / "n", cfg.model_copy(update={"max_length": 40}),
                  system_text=SYSTEM)  # fmt: skip


# --- accelerate launch --------------------------------------------------------------


def launch_two_processes(module: str, *args: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``python -m module args`` as two CPU processes with the
    shipped DDP config; it must exit 0."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "configs" / "accelerate" / "ddp.yaml"),
        "--num_processes", "2", "-m", module, *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_process_accelerate_launch_trains_and_writes_the_model(
    tiny_model: Path, tmp_path: Path
):
    examples = tmp_path / "examples.jsonl"
    examples.write_text("".join(json.dumps(r) + "\n" for r in EXAMPLES), encoding="utf-8")
    config = tmp_path / "train.yaml"
    config.write_text(
        "max_steps: 2\nwarmup_steps: 1\nper_device_batch_size: 2\nglobal_batch_size: 4\n"
        "gradient_checkpointing: false\nsave_steps: 1\n",
        encoding="utf-8",
    )
    out = tmp_path / "model"
    proc = launch_two_processes(
        "selfalign.train", "--examples", str(examples), "--base", str(tiny_model),
        "--out", str(out), "--config", str(config), "--system", SYSTEM,
    )  # fmt: skip
    summaries = [line for line in proc.stdout.splitlines() if line.startswith('{"model_dir"')]
    assert len(summaries) == 1  # the main process reports, once
    log = json.loads((out / "train_log.json").read_text())
    assert log["processes"] == 2 and log["global_step"] == 2
    # 2 processes x 2 per device: each optimizer step sees 4 of the 8 examples
    assert log["history"][-1]["epoch"] == pytest.approx(1.0)
    assert (out / "adapter_model.safetensors").is_file()
    assert AutoTokenizer.from_pretrained(out).chat_template == chat_template(SYSTEM)
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize(
    ("name", "kind"), [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero3", "DEEPSPEED")]
)
def test_shipped_accelerate_configs_load(name: str, kind: str):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == kind
    assert config.mixed_precision == "no"  # precision is the training config's to decide


def test_entry_point_bad_input_is_one_line_exit_2(tmp_path: Path, capsys):
    from selfalign.train.__main__ import main

    missing = tmp_path / "nope.jsonl"
    code = main(["--examples", str(missing), "--base", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--system", "x"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "nope.jsonl" in err and "\n" not in err


def test_full_fine_tuning_writes_a_plain_model(tiny_model: Path, tmp_path: Path):
    cfg = TrainConfig(**{**FAST, "max_steps": 2}, method="full", learning_rate=1e-3, merge=True)
    result = train_sft(EXAMPLES, tiny_model, tmp_path / "m", cfg, system_text=SYSTEM)
    out = result.model_dir
    assert result.merged_dir is None and not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    name = "model.layers.0.mlp.up_proj.weight"  # not a LoRA target: only full training moves it
    assert not torch.equal(model.state_dict()[name], base.state_dict()[name])
    assert AutoTokenizer.from_pretrained(out).chat_template == chat_template(SYSTEM)


# --- QLoRA (GPU) --------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA GPU")
def test_qlora_trains_and_merges_on_gpu(tiny_model: Path, tmp_path: Path):
    pytest.importorskip("bitsandbytes")
    cfg = TrainConfig(**{**FAST, "max_steps": 2}, method="qlora", merge=True)
    result = train_sft(EXAMPLES, tiny_model, tmp_path / "m", cfg, system_text=SYSTEM)
    assert result.global_step == 2 and (result.model_dir / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())


# --- demo model pre-training --------------------------------------------------------


def test_pretrain_tiny_learns_from_the_shipped_corpus(tiny_model: Path, tmp_path: Path):
    from selfalign.pretrain import pretrain_tiny

    model_dir = tmp_path / "tiny"
    shutil.copytree(tiny_model, model_dir)
    before = load_file(model_dir / "model.safetensors")
    result = pretrain_tiny(model_dir, steps=12, seed=0, block_size=128, batch_size=4)
    assert result.documents > 50
    assert result.final_loss < result.first_loss - 0.5
    after = load_file(model_dir / "model.safetensors")
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert json.loads((model_dir / "pretrain_log.json").read_text())["steps"] == 12
    AutoModelForCausalLM.from_pretrained(model_dir)  # still a normal model dir


def test_pretrain_corpus_reads_annotations_at_call_time(
    tiny_model: Path, tmp_path: Path, monkeypatch
):
    import selfalign.pretrain as pretrain

    notes = tmp_path / "annotations"
    notes.mkdir()
    (notes / "new_format.txt").write_text("Zebra format one\n====\nZebra format two\n")
    (notes / "seeds.jsonl").write_text('{"instruction": "Quokka task", "input": ""}\n')
    monkeypatch.setattr(pretrain, "ANNOTATIONS", notes)
    docs = pretrain.corpus_documents()
    assert {"Zebra format one", "Zebra format two", "Quokka task"} <= set(docs)

    # conversations are rendered by the chat template: end-of-turn after every answer
    tok = AutoTokenizer.from_pretrained(tiny_model)
    doc = f"{SYSTEM}\n\n### User:\nHi\n\n### Assistant:\nHello!\n\n### User:\nBye\n\n### Assistant:\nBye!"
    ids = pretrain.document_ids(doc, tok)
    messages = pretrain.parse_conversation(doc)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert ids == template_ids(tok, messages)
    assert ids.count(tok.eos_token_id) == 2


# --- the shipped 8B config ----------------------------------------------------------


def test_shipped_8b_config_fits_stage_2_answers(tmp_path: Path, tiny_model: Path, capsys):
    """configs/selfalign_8b.yaml (HHH block switched on, paths pointed at real files)
    validates, and its training lengths hold a whole generated answer and its end marker."""
    from selfalign.config import load_run_config

    text = (REPO / "configs" / "selfalign_8b.yaml").read_text()
    text = text.replace("/models/Meta-Llama-3.1-8B", str(tiny_model))
    tqa, hhh = tmp_path / "mc_task.json", tmp_path / "hhh_alignment"
    targets = {"Yes.": 1, "No.": 0}
    tqa.write_text(json.dumps([{"question": "Is water wet?", "mc1_targets": targets,
                                "mc2_targets": targets}]))  # fmt: skip
    hhh.mkdir()
    example = {"input": "How do I stay safe online?",
               "target_scores": {"Use strong passwords.": 1, "Share your passwords.": 0}}  # fmt: skip
    (hhh / "task.json").write_text(json.dumps({"examples": [example]}))
    text = re.sub(r"data: \S+mc_task\.json", f"data: {tqa}", text)
    text, n = re.subn(r"\n    # hhh:.*\n    #   data: \S+", f"\n    hhh:\n      data: {hhh}", text)
    assert n == 1  # the commented-out HHH block is there to fill in
    check = tmp_path / "gpu_check.json"  # as scripts/gpu_check.sh writes it on a GPU
    check.write_text(json.dumps({"environment": {"device": "NVIDIA H200"}, "lora": {
        "dtype": "bfloat16", "lora": {"r": 16}, "seq": 1024, "tokens_per_s": 5000.0}}))  # fmt: skip
    text, n = re.subn(r"gpu_check: null", f"gpu_check: {check}", text)
    assert n == 1
    config = tmp_path / "selfalign_8b.yaml"
    config.write_text(text)
    _, stages = load_run_config(config)
    assert stages["eval"].hhh.data == hhh
    answers = {"engraved": stages["aligned"].max_new_tokens,
               "verbose": stages["verbose"].max_new_tokens}  # fmt: skip
    for name, answer_tokens in answers.items():
        train = stages[name].train
        # system text (~50 tokens) + a user turn of a few hundred + the longest answer
        assert train.max_length >= answer_tokens + 384, name
        assert train.warmup_ratio is not None and train.warmup_ratio < 0.2, name
        assert train.accumulation_steps(world_size=1) * train.per_device_batch_size == 128
    # dry-run hours for training come from the GPU check's measured LoRA speed
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in ("engraved", "verbose"):
        stage = out[out.index(f"  {name} ") :]
        assert re.match(r"(?s).*?training \(at most \S+ tokens at 5,000 tokens/s, "
                        r"scripts/gpu_check.sh on NVIDIA H200", stage), name  # fmt: skip
    assert not (tmp_path / "run").exists()
