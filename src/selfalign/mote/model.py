"""Build, save, load and export MoTE models (and the plain-LoRA baseline).

A MoTE model stays the Hugging Face model it was (``LlamaForCausalLM``, ...): peft injects
one LoRA adapter per expert into every targeted ``nn.Linear`` (as ``MoteLinear``) and a
``TrainableTokensLayer`` for the step delimiters into the input and output embeddings.
A forward pre-hook on the model turns ``step_ids=`` (or the delimiters found in
``input_ids``) into the per-token routing every layer reads.

On disk a trained model is a normal model directory (base weights with the resized
embeddings, tokenizer with the step tokens, chat template) plus
``mote_adapter.safetensors`` and ``mote_config.json``; the plain-LoRA baseline stores a
peft adapter directory ``lora_adapter/`` instead of ``mote_adapter.safetensors``.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from peft import (
    LoraConfig,
    PeftModel,
    TrainableTokensConfig,
    get_peft_model,
    inject_adapter_in_model,
)
from safetensors.torch import load_file, save_file
from torch import nn

from selfalign.chat_format import chat_template
from selfalign.errors import InputError
from selfalign.mote.config import CONFIG_FILE, SHARED, MoteConfig
from selfalign.mote.layer import NO_STEP_EXPERT, MoteLinear, Router
from selfalign.mote.steps import StepTokens, add_step_tokens, step_ids_from_input_ids
from selfalign.text.steps import QUESTION, STEPS

ADAPTER_FILE = "mote_adapter.safetensors"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers reads a tokenizer's template
LORA_DIR = "lora_adapter"  # the plain-LoRA baseline's peft adapter
FORMAT = "selfalign-mote/1"
TOKENS_ADAPTER = "step_tokens"
Method = Literal["mote", "lora"]


@dataclass
class MoteState:
    """What selfalign attaches to a model it built (``model.mote_state``)."""

    method: Method
    config: MoteConfig
    tokens: StepTokens
    router: Router | None
    system: str | None = None  # system prompt the model was trained with


def mote_state(model: nn.Module) -> MoteState:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    state = getattr(base, "mote_state", None)
    if state is None:
        raise ValueError("not a model built by selfalign.mote (no mote_state)")
    return state


def linear_target_names(model: nn.Module) -> list[str]:
    """Leaf names of every ``nn.Linear`` except the output layer (peft's "all-linear")."""
    output = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not output
    }
    if not names:
        raise InputError("model has no nn.Linear layers for MoTE experts to wrap")
    return sorted(names)


def _embedding_names(model: nn.Module) -> list[str]:
    """Leaf names of the input embeddings and, when not tied to them, the output layer."""
    by_id = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    emb_in, emb_out = model.get_input_embeddings(), model.get_output_embeddings()
    names = [by_id[id(emb_in)]]
    if emb_out is not None and emb_out.weight is not emb_in.weight:
        names.append(by_id[id(emb_out)])
    return names


def _lora_config(config: MoteConfig, targets: list[str], **extra: Any) -> LoraConfig:
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        bias="none",
        **extra,
    )


def _adapters_to_float32(model: nn.Module) -> None:
    """Adapter weights train in float32 even over a bf16/fp16 base (as peft's autocast)."""
    for name, param in model.named_parameters():
        if ("lora_" in name or "trainable_tokens_delta" in name) and param.dtype in (
            torch.float16,
            torch.bfloat16,
        ):
            param.data = param.data.float()


def build_mote(
    model: nn.Module, tokenizer, config: MoteConfig | None = None, *, system: str | None = None
) -> nn.Module:
    """Turn a Hugging Face causal LM into a MoTE model, in place; returns the same model.

    Adds the step tokens (resizing the embeddings), one LoRA expert per step plus the
    shared expert on every targeted linear layer, trainable rows for the new tokens, and
    the routing hook. Only adapter weights and the new token rows require grad.
    """
    config = config or MoteConfig()
    if getattr(model, "mote_state", None) is not None:
        raise ValueError("this model already has MoTE experts")
    tokens = add_step_tokens(model, tokenizer)
    targets = (
        linear_target_names(model)
        if config.target_modules == "all-linear"
        else config.target_modules
    )
    experts = [*STEPS, SHARED] if config.shared_expert else list(STEPS)
    with warnings.catch_warnings():
        # Intended: several adapters in one model. And with tied embeddings peft warns that
        # it cannot tie LoRA adapters; the step-token rows (the only embedding adapter
        # here) are tied correctly (see test_tied_embedding_model).
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings=True.*")
        for name in experts:
            lora = _lora_config(config, targets)
            lora._register_custom_module({nn.Linear: MoteLinear})
            inject_adapter_in_model(lora, model, adapter_name=name)
        inject_adapter_in_model(
            TrainableTokensConfig(
                target_modules=_embedding_names(model), token_indices=list(tokens.all)
            ),
            model,
            adapter_name=TOKENS_ADAPTER,
        )
    gated = config.routing == "gate"
    router = Router(
        alpha=config.alpha,
        shared=config.shared_expert,
        question_expert=NO_STEP_EXPERT
        if config.question_expert == SHARED
        else STEPS.index(config.question_expert),
        seed=config.seed,
        gate_top_k=config.top_k if gated else None,
        contrastive=gated and config.contrastive_weight > 0,
    )
    layers = [m for m in model.modules() if isinstance(m, MoteLinear)]
    if not layers:
        raise InputError(f"no MoTE layer was created (target_modules={targets})")
    for layer in layers:
        layer.router = router
        layer.set_adapter(experts)  # all experts active: trainable, none merged
        if gated:  # a token-level gate over the step experts (its name makes it an adapter)
            gate = nn.Linear(layer.in_features, len(STEPS), bias=False)
            nn.init.normal_(gate.weight, std=0.02)
            layer.lora_gate = gate.to(layer.lora_A[STEPS[0]].weight.device)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name or "trainable_tokens_delta" in name
    _adapters_to_float32(model)
    model.mote_state = MoteState("mote", config, tokens, router, system)
    model.register_forward_pre_hook(_route_pre_hook, with_kwargs=True)
    return model


def _route_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Set the routing for this forward pass from ``step_ids=`` or the delimiters
    (and ``question_expert=``, one expert index per sequence, if given; ``token_mask=``,
    the real tokens, for a gated model's auxiliary losses).

    With a non-empty KV cache (incremental decoding) the new tokens continue the step
    each row was in, so a start token emitted by the model switches experts for itself
    and everything after it, while earlier K/V stay as they were computed.
    """
    state: MoteState = module.mote_state
    router = state.router
    router.aux_losses = {}  # (an activation-checkpointing recomputation leaves some behind)
    step_ids = kwargs.pop("step_ids", None)
    question_expert = kwargs.pop("question_expert", None)
    token_mask = kwargs.pop("token_mask", None)
    if router.gate_top_k is not None:  # the gate routes; step ids are not needed
        # its aux losses count real tokens only: the collator's token_mask (training passes
        # a 4D mask, which does not say which rows are padding), else a 2D attention mask
        mask = kwargs.get("attention_mask")
        if token_mask is None and mask is not None and mask.dim() == 2:
            token_mask = mask > 0
        router.token_mask = token_mask.reshape(-1) if token_mask is not None else None
        return args, kwargs
    if step_ids is None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("a MoTE model called with inputs_embeds needs step_ids=")
        # transformers 5 passes the KV cache as ``cache=`` (``past_key_values`` before)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        initial: torch.Tensor | int = QUESTION
        if cache is not None and cache.get_seq_length() > 0:
            last = router.last_step
            if last is None or len(last) not in (1, len(input_ids)):
                raise RuntimeError(
                    "MoTE cannot tell which step the cached rows are in (the batch changed "
                    "between calls); pass step_ids= explicitly"
                )
            initial = last.expand(len(input_ids)) if len(last) == 1 else last
        step_ids = step_ids_from_input_ids(input_ids, state.tokens, initial)
        if router.force_step is not None and isinstance(initial, int):  # a fresh prefill
            step_ids = torch.full_like(step_ids, router.force_step)
    router.last_step = step_ids[:, -1]
    router.route(router.assign(step_ids, training=module.training, question_expert=question_expert))
    return args, kwargs


def build_lora(
    model: nn.Module, tokenizer, config: MoteConfig | None = None, *, system: str | None = None
) -> PeftModel:
    """The plain-LoRA baseline: one peft LoRA adapter on the same layers, same token rows."""
    config = config or MoteConfig()
    tokens = add_step_tokens(model, tokenizer)
    targets = (
        linear_target_names(model)
        if config.target_modules == "all-linear"
        else config.target_modules
    )
    names = _embedding_names(model)
    lora = _lora_config(
        config, targets, trainable_token_indices={n: list(tokens.all) for n in names}
    )
    peft_model = get_peft_model(model, lora)
    peft_model.get_base_model().mote_state = MoteState("lora", config, tokens, None, system)
    return peft_model


# ---------------------------------------------------------------- save / load


def _is_adapter_key(key: str) -> bool:
    return "lora_" in key or "trainable_tokens_" in key


def _base_key(key: str) -> str:
    return re.sub(r"\.(base_layer|token_adapter|original_module)(?=\.)", "", key)


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base weights under their original names (adapters stripped)."""
    return {_base_key(k): v for k, v in model.state_dict().items() if not _is_adapter_key(k)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Expert weights and step-token rows; a tensor shared by tied layers appears once."""
    out, seen = {}, set()
    for key, value in model.state_dict().items():
        if ("lora_" in key or "trainable_tokens_delta" in key) and value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            out[key] = value.detach().contiguous()
    return out


def _write_config(out: Path, state: MoteState) -> None:
    payload = {
        "format": FORMAT,
        "method": state.method,
        "steps": list(STEPS),
        "system": state.system,
        "mote": state.config.model_dump(),
    }
    (out / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def fallback_chat_template(tokenizer, system: str | None) -> str:
    """The template for a tokenizer without one: selfalign's chat format, in which
    ``prompt_ids`` then built the prompts, with the training system text as default.
    It writes BOS only where the tokenizer itself adds one, as that fallback did."""
    template = chat_template(system or "")
    bos = tokenizer.bos_token_id
    if bos is None or tokenizer("x").input_ids[:1] != [bos]:
        template = template.removeprefix("{{ bos_token }}")
    return template


def save_mote(model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """Write base model dir + tokenizer + adapter files (see module docstring)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = mote_state(model)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    base.save_pretrained(out, state_dict=base_state_dict(base))
    tokenizer.save_pretrained(out)
    if not tokenizer.chat_template:
        template = fallback_chat_template(tokenizer, state.system)
        (out / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
    if state.method == "lora":
        # In a subfolder: transformers would auto-load an adapter_config.json beside config.json.
        model.save_pretrained(out / LORA_DIR, save_embedding_layers=False)
    else:
        save_file(adapter_state_dict(model), str(out / ADAPTER_FILE), metadata={"format": FORMAT})
    _write_config(out, state)
    return out


def read_mote_config(path: str | Path) -> dict[str, Any]:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise InputError(f"not a selfalign MoTE model directory (no {CONFIG_FILE})", file=path)
    try:
        payload = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"invalid JSON: {exc.msg}", file=file, line=exc.lineno) from None
    if payload.get("format") != FORMAT:
        raise InputError(f"unsupported format {payload.get('format')!r}", file=file, field="format")
    return payload


def load_mote(
    path: str | Path, *, dtype: torch.dtype | str = "auto", device: str | torch.device = "cpu"
) -> tuple[nn.Module, Any]:
    """Load a model saved by ``save_mote`` (either method), in eval mode, frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    payload = read_mote_config(path)
    config = MoteConfig(**payload["mote"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if payload["method"] == "lora":
        tokens = add_step_tokens(model, tokenizer)
        model = PeftModel.from_pretrained(model, path / LORA_DIR)
        model.get_base_model().mote_state = MoteState(
            "lora", config, tokens, None, payload.get("system")
        )
    else:
        build_mote(model, tokenizer, config, system=payload.get("system"))
        weights = load_file(str(path / ADAPTER_FILE))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        expected = set(adapter_state_dict(model))
        if unexpected or expected & set(missing):
            raise InputError(
                f"adapter does not match the model: {len(expected & set(missing))} missing, "
                f"{len(unexpected)} unexpected tensors",
                file=path / ADAPTER_FILE,
            )
    model.to(device).eval()
    for param in model.parameters():
        param.requires_grad = False
    return model, tokenizer


@torch.no_grad()
def export_merged_step(model: nn.Module, tokenizer, step: str, out_dir: str | Path) -> Path:
    """Save a plain model dir whose weights are W0 + the ``step`` and shared experts merged.

    It equals the MoTE model with every token (the question included) routed to
    ``step``: e.g. the "answer" export serves answer-only mode with any HF/vLLM stack.
    """
    if step not in STEPS:
        raise InputError(f"unknown step {step!r}; expected one of {', '.join(STEPS)}")
    if mote_state(model).method != "mote":
        raise InputError(
            "export_merged_step needs a MoTE model (for plain LoRA use peft's merge_and_unload)"
        )
    weights = base_state_dict(model)
    for name, module in model.named_modules():
        if isinstance(module, MoteLinear):
            key = f"{name}.weight"
            weights[key] = (weights[key] + module.step_delta_weight(step)).to(weights[key].dtype)
        elif type(module).__name__ == "TrainableTokensLayer":
            key = f"{name}.weight"
            weights[key] = module.get_merged_weights([TOKENS_ADAPTER]).to(weights[key].dtype)
    out = Path(out_dir)
    model.save_pretrained(out, state_dict=weights)
    tokenizer.save_pretrained(out)
    return out
