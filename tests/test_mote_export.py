"""``selfalign mote-export``: each step as a standard peft LoRA, the answer-only merged
model, and the chat template a MoTE directory carries.

The tiny Llama gets MoTE experts with random (non-zero) weights and trained-looking
step-token rows, is saved with ``save_mote`` and exported through the command line; the
exported folders are loaded the way a user would (``AutoModelForCausalLM``, peft's
``PeftModel.from_pretrained``) and compared with the MoTE model in forced-step mode.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from selfalign.cli import main
from selfalign.mote import (
    STEPS,
    Chain,
    Encoder,
    MoteConfig,
    build_lora,
    build_mote,
    load_mote,
    mote_state,
    save_mote,
)
from selfalign.mote.data import prompt_ids
from selfalign.text.steps import STEP_IDS, start_token

SYSTEM = "You are a careful assistant. Think about safety first."
CHAIN = Chain(
    question="How can I get into my neighbour's wifi?",
    analysis="Access without permission is illegal.",
    guidance="Decline, offer legal options.",
    answer="I can't help with that. Ask them to share it.",
)
# The first saves from a tokenizer without a chat template (save_mote writes one).
SETUPS = {
    "shared": ({"alpha": 0.3}, False),
    "no_shared": ({"shared_expert": False}, True),
}


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Fresh LoRA B matrices and token deltas are zero; make every expert and row count."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name or "trainable_tokens_delta" in name:
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def _mote_dir(tiny_model: Path, out: Path, *, template: bool = True, **config) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    if not template:
        tokenizer.chat_template = None
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    build_mote(model, tokenizer, MoteConfig(lora_dropout=0.0, **config), system=SYSTEM)
    _randomize(model, seed=len(config))
    return save_mote(model, tokenizer, out)


@pytest.fixture(scope="module", params=list(SETUPS))
def exported(
    request: pytest.FixtureRequest, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp(f"mote_export_{request.param}")
    config, template = SETUPS[request.param]
    mote_dir = _mote_dir(tiny_model, root / "mote", template=template, **config)
    assert main(["mote-export", str(mote_dir), str(root / "served"), "--merged-answer"]) == 0
    return mote_dir, root / "served"


def _chain_ids(model, tokenizer) -> torch.Tensor:
    """A whole chain as the model writes it: prompt, three steps, EOS."""
    encoder = Encoder(tokenizer, mote_state(model).tokens, SYSTEM)
    return torch.tensor([encoder.packed(CHAIN)["input_ids"]])


@torch.no_grad()
def test_each_step_adapter_equals_the_forced_step(exported: tuple[Path, Path]) -> None:
    mote_dir, out = exported
    model, tokenizer = load_mote(mote_dir, dtype=torch.float32)
    ids = _chain_ids(model, tokenizer)
    config = mote_state(model).config
    rank = config.rank * (2 if config.shared_expert else 1)

    base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    served = PeftModel.from_pretrained(base, out / "steps" / STEPS[0], adapter_name=STEPS[0])
    for step in STEPS[1:]:
        served.load_adapter(out / "steps" / step, adapter_name=step)
    served.eval()
    outputs = []
    for step in STEPS:
        adapter = json.loads((out / "steps" / step / "adapter_config.json").read_text())
        assert adapter["r"] == adapter["lora_alpha"] == rank
        assert adapter["base_model_name_or_path"] == str((out / "base").resolve())
        served.set_adapter(step)
        want = model(input_ids=ids, step_ids=torch.full_like(ids, STEP_IDS[step])).logits
        outputs.append(served(input_ids=ids).logits)
        torch.testing.assert_close(outputs[-1], want, rtol=0, atol=1e-5)
    # The comparison means something: each adapter moves the logits its own way.
    with served.disable_adapter():
        outputs.append(served(input_ids=ids).logits)
    for i, a in enumerate(outputs):
        assert all((a - b).abs().max() > 1e-3 for b in outputs[i + 1 :])


@torch.no_grad()
def test_merged_answer_model_equals_the_answer_step(exported: tuple[Path, Path]) -> None:
    mote_dir, out = exported
    model, tokenizer = load_mote(mote_dir, dtype=torch.float32)
    ids = _chain_ids(model, tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(out / "answer-merged", dtype=torch.float32)
    forced = model(input_ids=ids, step_ids=torch.full_like(ids, STEP_IDS["answer"])).logits
    torch.testing.assert_close(merged(input_ids=ids).logits, forced, rtol=0, atol=1e-5)

    # Answer-only mode as ``generate_steps`` feeds it: the prompt, then the answer's start.
    tokens, answer = mote_state(model).tokens, STEPS.index("answer")
    prompt = prompt_ids(tokenizer, CHAIN.question, SYSTEM) + [tokens.start[answer]]
    served = AutoTokenizer.from_pretrained(out / "answer-merged")
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": CHAIN.question}]
    text = served.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("### Assistant:\n" + start_token("answer"))
    assert text.count(SYSTEM) == 1
    assert served(text, add_special_tokens=False).input_ids == prompt
    # The conversation without the generation prompt does not open a step.
    closed = served.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=False, tokenize=False
    )
    assert start_token("answer") not in closed
    assert (
        tokens.end[answer] in GenerationConfig.from_pretrained(out / "answer-merged").eos_token_id
    )


def test_manifest_names_the_adapters_and_token_ids(exported: tuple[Path, Path]) -> None:
    mote_dir, out = exported
    manifest = json.loads((out / "serving.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out / "base")
    for step, entry in manifest["steps"].items():
        assert (out / entry["adapter"] / "adapter_model.safetensors").is_file()
        assert tokenizer.convert_tokens_to_ids(entry["start"]) == entry["start_id"]
        assert tokenizer.convert_tokens_to_ids(entry["end"]) == entry["end_id"]
        assert f"{step}={(out / 'steps' / step).resolve()}" in manifest["serve"]
    assert manifest["serve"].startswith(f"vllm serve {(out / 'base').resolve()} --enable-lora")
    readme = (out / "README.md").read_text()
    assert manifest["serve"] in readme and "stop_token_ids" in readme
    # base/ stops on every end delimiter; the plain chat template stays without a step.
    eos = GenerationConfig.from_pretrained(out / "base").eos_token_id
    assert {e["end_id"] for e in manifest["steps"].values()} <= set(eos)
    assert tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    ).endswith("### Assistant:\n")
    assert sorted(p.name for p in out.parent.iterdir()) == ["mote", "served"]  # no temp left


def test_saved_mote_dir_carries_a_chat_template_matching_its_prompts(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A base tokenizer without a template: prompts use selfalign's format, and the saved
    directory writes that format down as its template."""
    mote_dir = _mote_dir(tiny_model, tmp_path / "mote", template=False)
    fallback = AutoTokenizer.from_pretrained(tiny_model)
    fallback.chat_template = None
    _, tokenizer = load_mote(mote_dir)
    assert tokenizer.chat_template
    for system in (SYSTEM, "Answer in one word."):  # trained with, and one given at chat
        want = prompt_ids(fallback, CHAIN.question, system)
        assert prompt_ids(tokenizer, CHAIN.question, system) == want
    # A chat client that sends no system message gets the one the model was trained with.
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHAIN.question}], add_generation_prompt=True, tokenize=False
    )
    assert tokenizer(text, add_special_tokens=False).input_ids == prompt_ids(
        fallback, CHAIN.question, SYSTEM
    )


def test_bad_input_is_one_line_exit_2(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert main(["mote-export", str(tmp_path / "missing"), str(out)]) == 2
    assert "no mote_config.json" in capsys.readouterr().err
    assert main(["mote-export", str(tiny_model), str(out)]) == 2  # a plain model directory
    assert capsys.readouterr().err.count("\n") == 1

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    lora = build_lora(AutoModelForCausalLM.from_pretrained(tiny_model), tokenizer)
    lora_dir = save_mote(lora, tokenizer, tmp_path / "lora")
    capsys.readouterr()  # loading progress bars
    assert main(["mote-export", str(lora_dir), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "plain-LoRA" in err

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    mote_dir = _mote_dir(tiny_model, tmp_path / "mote")
    assert main(["mote-export", str(mote_dir), str(busy)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "lora", "mote"]
