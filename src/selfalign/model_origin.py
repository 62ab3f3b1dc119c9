"""Where a base model comes from: its Hub id and its license, read from its folder.

Model cards name the base model (``base_model`` must be a Hub id for the Hub to accept
the card) and its license. Both are read from what the folder says, never guessed from
the architecture alone, except for Gemma: every Gemma checkpoint is released under the
Gemma Terms of Use, so ``model_type: gemma*`` is enough. Nothing here reaches a network.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from selfalign.gguf_model import CONVERSION_FILE, DEMO_MODEL_NAME

DEMO_HUB_ID = "google/gemma-3-270m"  # what the demo's GGUF package was converted from
GEMMA_TERMS = "https://ai.google.dev/gemma/terms"
_LICENSE_FILE = re.compile(r"(licen[cs]e|terms|notice|use_policy)", re.IGNORECASE)
_LICENSE_SUFFIXES = {"", ".txt", ".md", ".html", ".htm", ".rst"}
# (text a license file contains, Hub license id), most specific first
_LICENSE_MARKERS: tuple[tuple[str, str], ...] = (
    ("gemma terms of use", "gemma"),
    ("llama 3.3 community license", "llama3.3"),
    ("llama 3.2 community license", "llama3.2"),
    ("llama 3.1 community license", "llama3.1"),
    ("meta llama 3 community license", "llama3"),
    ("llama 2 community license", "llama2"),
    ("apache license", "apache-2.0"),
    ("mit license", "mit"),
    ("permission is hereby granted, free of charge", "mit"),
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class License:
    id: str  # a Hub license id (gemma, apache-2.0, llama3.1, ...) or "other"
    source: str  # where it was read ("" when nothing said)
    link: str | None = None


@dataclass(frozen=True)
class ModelOrigin:
    ref: str  # the Hub id when known, else the local path (or the spec of a server)
    hub_id: str | None
    path: Path | None
    license: License


def model_origin(spec: str, hub_id: str | None = None) -> ModelOrigin:
    """The origin of the model a run config names (``hub_id`` overrides what is found)."""
    from selfalign.backends.spec import parse_spec

    path = parse_spec(spec).path
    if path is None or not path.is_dir():
        return ModelOrigin(hub_id or spec, hub_id, path, License("other", ""))
    hub_id = hub_id or find_hub_id(path)
    return ModelOrigin(hub_id or str(path), hub_id, path, find_license(path))


def is_hub_id(text: str) -> bool:
    """``org/name`` as the Hub spells repository ids (not a local path)."""
    return bool(_HUB_ID.match(text)) and ".." not in text and not Path(text).exists()


def find_hub_id(model_dir: Path) -> str | None:
    """The Hub id a local folder was downloaded or converted from, if it says."""
    parts = model_dir.resolve().parts
    for i, part in enumerate(parts[:-1]):  # the Hub cache: models--ORG--NAME/snapshots/SHA
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return "/".join(part.split("--")[1:]) or None
    conversion = _json(model_dir / CONVERSION_FILE)
    if str(conversion.get("gguf_file", "")).startswith(DEMO_MODEL_NAME):
        return DEMO_HUB_ID
    named = _json(model_dir / "config.json").get("_name_or_path")
    if isinstance(named, str) and is_hub_id(named):
        return named
    return None


def find_license(model_dir: Path) -> License:
    """The base model's license: its card's metadata, a license file, or Gemma's type."""
    readme = model_dir / "README.md"
    if readme.is_file():
        from huggingface_hub import ModelCard

        try:
            data = ModelCard.load(readme, ignore_metadata_errors=True).data
        except (ValueError, OSError):
            data = None
        if data is not None and isinstance(data.license, str):
            return License(data.license, "README.md metadata", data.license_link)
    for file in sorted(model_dir.iterdir()):
        if file.is_file() and _LICENSE_FILE.search(file.stem) and file.suffix in _LICENSE_SUFFIXES:
            text = file.read_text(encoding="utf-8", errors="replace")[:50_000].lower()
            text = " ".join(text.split())
            for marker, license_id in _LICENSE_MARKERS:
                if marker in text:
                    link = GEMMA_TERMS if license_id == "gemma" else None
                    return License(license_id, file.name, link)
    model_type = str(_json(model_dir / "config.json").get("model_type", ""))
    if model_type.startswith(("gemma", "recurrent_gemma")):
        return License("gemma", f"model_type {model_type}", GEMMA_TERMS)
    return License("other", "")


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
