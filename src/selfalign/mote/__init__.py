"""MoTE: a mixture of LoRA experts, one per reasoning step, plus a shared expert.

What other parts of selfalign call:
- ``train_mote(chains, base_model, out_dir, MoteTrainConfig(...))``: train and save;
- ``load_mote(dir)`` -> (model, tokenizer); ``is_mote_dir(dir)``;
- ``generate_steps(model, tokenizer, questions, mode=...)`` -> ``StepOutput`` per question
  (``.record()`` is a chain record, ``.render()`` the steps for display);
- ``build_mote`` / ``save_mote`` / ``export_merged_step`` for custom loops and serving;
  ``export_mote(dir, out)``: one peft LoRA adapter per step for a LoRA server.

Names are imported from their modules on first use, so ``import selfalign.mote`` (and the
settings in ``mote.config``) cost no torch or peft import until a model is touched.
"""

from __future__ import annotations

from selfalign.lazy import lazy_getattr

_EXPORTS = {
    "config": ("MoteConfig", "MoteTrainConfig", "is_mote_dir"),
    "data": ("Chain", "Encoder", "StepCollator", "parse_chains"),
    "export": ("export_mote",),
    "generate": ("MODES", "StepOutput", "generate_steps"),
    "layer": ("MoteLinear", "Router"),
    "model": (
        "build_lora",
        "build_mote",
        "export_merged_step",
        "load_mote",
        "mote_state",
        "save_mote",
    ),  # fmt: skip
    "steps": ("STEPS", "StepTokens", "add_step_tokens", "step_ids_from_input_ids"),
    "train": ("MoteTrainResult", "train_mote"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)

__getattr__ = lazy_getattr(__name__, _MODULE_OF)
