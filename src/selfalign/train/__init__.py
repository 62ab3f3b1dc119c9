"""Supervised fine-tuning (principle engraving, verbose cloning): see ``train.sft``.

Names are imported from their modules on first use: the settings (``train.config``) load
without torch, transformers or trl.
"""

from __future__ import annotations

from selfalign.lazy import lazy_getattr

_MODULE_OF = {
    "TrainConfig": "config",
    "load_train_config": "config",
    "parse_train_config": "config",
    "TrainResult": "sft",
    "build_trainer": "sft",
    "train_sft": "sft",
}
__all__ = sorted(_MODULE_OF)

__getattr__ = lazy_getattr(__name__, _MODULE_OF)
