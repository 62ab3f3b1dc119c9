"""``selfalign mote-export MOTE_DIR OUT``: a MoTE model as files a LoRA server runs.

::

    OUT/
      base/                      the base weights with the trained step-token rows, the
                                 tokenizer (step tokens, chat template); stops on the end
                                 delimiters
      steps/<step>/              analysis, guidance, answer: one standard peft LoRA adapter
                                 each (adapter_config.json, adapter_model.safetensors)
      answer-merged/             --merged-answer: the answer step merged into the weights,
                                 with a chat template that opens the answer step
      serving.json, README.md    how to serve, and the client-side step loop

A MoTE layer computes ``W0 x + a E_step(x) + (1 - a) E_shared(x)``. For one step that is a
single LoRA of rank ``r_step + r_shared`` (a concatenation, what peft's
``add_weighted_adapter(combination_type="cat")`` computes): ``A = [a s_step A_step;
(1 - a) s_shared A_shared]``, ``B = [B_step, B_shared]`` and ``lora_alpha = rank`` so peft's
scaling is 1. Without a shared expert the step's LoRA is written with scaling 1 alone.
Each adapter therefore equals the MoTE model with every token routed to that step.

The step-token rows are trained (peft's trainable tokens), so they are not in the MoTE
directory's own base weights; ``base/`` carries them, and the adapters name it as their
base. OUT is written beside itself under a temporary name and renamed at the end.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn
from transformers import GenerationConfig

from selfalign.errors import InputError
from selfalign.mote.config import SHARED, is_mote_dir
from selfalign.mote.layer import MoteLinear
from selfalign.mote.model import (
    TOKENS_ADAPTER,
    base_state_dict,
    export_merged_step,
    fallback_chat_template,
    load_mote,
    mote_state,
    read_mote_config,
)
from selfalign.store import folder_in_place
from selfalign.text.steps import STEPS, end_token, start_token

MANIFEST = "serving.json"
README = "README.md"
PEFT_PREFIX = "base_model.model."  # how peft names a wrapped model's modules on disk
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # --max-lora-rank values vLLM accepts


def export_mote(mote_dir: str | Path, out: str | Path, *, merged_answer: bool = False) -> Path:
    """Write the serving export of a MoTE directory to ``out`` (new or empty); returns it."""
    mote_dir, out = Path(mote_dir), Path(out)
    _check_input(mote_dir, out)
    model, tokenizer = load_mote(mote_dir, dtype="auto")
    with folder_in_place(out) as tmp:
        system = mote_state(model).system
        template = tokenizer.chat_template or fallback_chat_template(tokenizer, system)
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = template
        base_dir = out.resolve() / "base"  # where the adapters will find it after the rename
        write_base(model, tokenizer, tmp / "base")
        rank = 0
        for step in STEPS:
            rank = write_step_adapter(model, step, tmp / "steps" / step, str(base_dir))
        if merged_answer:
            write_merged_answer(model, tokenizer, tmp / "answer-merged")
        manifest = serving_manifest(model, base_dir, rank, merged_answer)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        (tmp / README).write_text(serving_readme(manifest), encoding="utf-8")
    return out


def _check_input(mote_dir: Path, out: Path) -> None:
    if not is_mote_dir(mote_dir):
        raise InputError(
            "not a selfalign MoTE model directory (no mote_config.json)", file=mote_dir
        )
    payload = read_mote_config(mote_dir)
    if payload.get("method") != "mote":
        raise InputError(
            "a plain-LoRA baseline: its lora_adapter/ folder is already a peft adapter",
            file=mote_dir,
        )
    if (payload.get("mote") or {}).get("routing", "step") != "step":
        raise InputError(
            "a gated ablation model (Vanilla MoE, MixLoRA): a learned gate mixes its experts "
            "per token, which no per-step LoRA adapter can stand for",
            file=mote_dir,
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError("exists and is not empty", file=out)


def _with_token_rows(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base weights with the trained step-token rows written into the embeddings."""
    weights = base_state_dict(model)
    for name, module in model.named_modules():
        if type(module).__name__ == "TrainableTokensLayer":
            key = f"{name}.weight"
            weights[key] = module.get_merged_weights([TOKENS_ADAPTER]).to(weights[key].dtype)
    return weights


@torch.no_grad()
def write_base(model: nn.Module, tokenizer, out: Path) -> Path:
    """The model the step adapters apply to: base weights + step-token rows."""
    model.save_pretrained(out, state_dict=_with_token_rows(model))
    tokenizer.save_pretrained(out)
    tokens = mote_state(model).tokens
    _stop_on(out, list(tokens.end), tokenizer.eos_token_id)
    return out


@torch.no_grad()
def step_lora(layer: MoteLinear, step: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one LoRA with scaling 1 that equals ``layer`` for tokens of ``step``."""
    router = layer.router
    assert router is not None
    parts = [(step, router.step_weight)]
    if router.shared:
        parts.append((SHARED, 1.0 - router.alpha))
    a = [layer.lora_A[n].weight.float() * (w * layer.scaling[n]) for n, w in parts]
    b = [layer.lora_B[n].weight.float() for n, _ in parts]
    return torch.cat(a, dim=0).contiguous(), torch.cat(b, dim=1).contiguous()


def write_step_adapter(model: nn.Module, step: str, out: Path, base: str) -> int:
    """Write ``step`` as a peft LoRA adapter folder; returns its rank."""
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    rank = 0
    for name, module in model.named_modules():
        if isinstance(module, MoteLinear):
            lora_a, lora_b = step_lora(module, step)
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = lora_a
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = lora_b
            targets.add(name.rsplit(".", 1)[-1])
            rank = lora_a.shape[0]
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,  # scaling 1: the mixing weights and scalings are inside A
        lora_dropout=0.0,
        target_modules=sorted(targets),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base,
    )
    out.mkdir(parents=True)
    config.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return rank


def answer_template(template: str) -> str:
    """The chat template, opening the answer step after the assistant's turn opens."""
    tag = json.dumps(start_token("answer"))
    return template + "{% if add_generation_prompt %}{{ " + tag + " }}{% endif %}"


def write_merged_answer(model: nn.Module, tokenizer, out: Path) -> Path:
    """Plain weights equal to the answer step (question tokens included), for a plain
    chat client: the template opens the answer step and generation stops at its end."""
    answer_tokenizer = copy.deepcopy(tokenizer)
    answer_tokenizer.chat_template = answer_template(tokenizer.chat_template)
    export_merged_step(model, answer_tokenizer, "answer", out)
    _stop_on(out, [mote_state(model).tokens.end[STEPS.index("answer")]], tokenizer.eos_token_id)
    return out


def _stop_on(folder: Path, ids: list[int], eos: int | None) -> None:
    """Add ``ids`` to the generation config's EOS ids (vLLM and generate stop on them)."""
    try:
        config = GenerationConfig.from_pretrained(folder)
    except OSError:
        config = GenerationConfig()
    current = config.eos_token_id if config.eos_token_id is not None else eos
    old = [] if current is None else [current] if isinstance(current, int) else list(current)
    config.eos_token_id = [*old, *(i for i in ids if i not in old)]
    config.save_pretrained(folder)


def _vllm_rank(rank: int) -> int:
    return next((r for r in VLLM_RANKS if r >= rank), rank)


def serving_manifest(
    model: nn.Module, base: Path, rank: int, merged_answer: bool
) -> dict[str, Any]:
    """What a server and a client need: paths, token ids, and the commands."""
    state = mote_state(model)
    steps = {
        step: {
            "adapter": f"steps/{step}",
            "start": start_token(step),
            "end": end_token(step),
            "start_id": state.tokens.start[i],
            "end_id": state.tokens.end[i],
        }
        for i, step in enumerate(STEPS)
    }
    modules = " ".join(f"{s}={base.parent / 'steps' / s}" for s in STEPS)
    manifest: dict[str, Any] = {
        "format": "selfalign-mote-serving/1",
        "base": "base",
        "lora_rank": rank,
        "alpha": state.config.alpha,
        "shared_expert": state.config.shared_expert,
        "question_expert": state.config.question_expert,
        "system": state.system,
        "steps": steps,
        "serve": f"vllm serve {base} --enable-lora --max-lora-rank {_vllm_rank(rank)} "
        f"--lora-modules {modules}",
    }
    if merged_answer:
        manifest["answer_merged"] = {
            "path": "answer-merged",
            "serve": f"vllm serve {base.parent / 'answer-merged'}",
            "exact": state.config.question_expert == "answer",
        }
    return manifest


def serving_readme(manifest: dict[str, Any]) -> str:
    """README.md: the commands and the step loop, in a few lines."""
    steps = manifest["steps"]
    ids = ", ".join(f"{s} {v['start_id']}/{v['end_id']}" for s, v in steps.items())
    experts = "and the shared expert combined " if manifest["shared_expert"] else ""
    # the expert that reads the question and so picks the first step (shared: none of them)
    first = manifest["question_expert"] if manifest["question_expert"] in steps else "answer"
    lines = [
        "# MoTE export for serving",
        "",
        "Each reasoning step is a standard peft LoRA adapter in `steps/<step>/`: the step's",
        f"expert {experts}as one adapter (rank {manifest['lora_rank']}, scaling 1). `base/`",
        "is the model they apply to (the base weights with the trained step-token rows); it",
        "carries the chat template.",
        "",
        "```bash",
        manifest["serve"],
        "```",
        "",
        "The client writes the chain one step at a time (completions API):",
        "",
        "1. Render the question with `base/`'s chat template (`add_generation_prompt=True`) and",
        "   send it with `add_special_tokens: false` (the template writes the BOS itself).",
        "2. For each step of the plan (for example analysis, guidance, answer): append the",
        "   step's start token to the prompt, ask the adapter named after the step for a",
        "   completion with `stop_token_ids: [<end id>]`, then append the text and the end",
        "   token.",
        "3. The reply is the answer step's text. To let the model choose the steps, ask for",
        "   one token with `allowed_token_ids` set to the later steps' start ids, from the",
        f"   `{first}` adapter after the question and from the adapter of the step just",
        "   written after a step.",
        "",
        f"Token ids (start/end): {ids}.",
        "",
        "A served step recomputes the whole prefix with its own adapter (every token routed",
        "to that step). `selfalign chat` keeps each earlier token as its own step's expert",
        "computed it, so served chains can differ from its chains.",
    ]
    merged = manifest.get("answer_merged")
    if merged:
        lines += [
            "",
            "`answer-merged/` is a plain model with the answer step merged into its weights.",
            "Its chat template opens the answer step and generation stops at its end token,",
            "so any chat client gets answer-only replies:",
            "",
            "```bash",
            merged["serve"],
            "```",
        ]
        if not merged["exact"]:
            lines.append(
                "\nThe model routes question tokens to the "
                f"`{manifest['question_expert']}` expert, so this is close to, not equal to, "
                "its answer-only mode."
            )
    return "\n".join(lines) + "\n"
