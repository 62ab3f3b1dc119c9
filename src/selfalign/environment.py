"""What a run ran on: library versions, Python, platform, devices and the settings that
change numerics, so two runs can be compared (``compare``).

Versions come from package metadata, without importing the packages. Devices and torch's
numerics switches need torch: ``environment_record`` imports it when called (the runner
calls it while executing stages; ``status`` and ``--dry-run`` never do).

Only the environment variables named in ``NUMERICS_ENV`` are read: every other variable
may hold a secret (API keys live there) and is never recorded.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

from selfalign import __version__
from selfalign.store import stable_hash

PACKAGES = (
    "torch", "transformers", "peft", "trl", "accelerate", "datasets", "tokenizers",
    "safetensors", "vllm", "bitsandbytes", "flash_attn", "deepspeed", "numpy",
)  # fmt: skip
# Variables that change what the numbers come out as (threads, TF32, cuBLAS workspace,
# visible devices, hashing, tokenizer threads): the only ones recorded.
NUMERICS_ENV = (
    "CUBLAS_WORKSPACE_CONFIG", "PYTORCH_CUDA_ALLOC_CONF", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    "NVIDIA_TF32_OVERRIDE", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "CUDA_VISIBLE_DEVICES",
    "TOKENIZERS_PARALLELISM", "PYTHONHASHSEED",
)  # fmt: skip


def package_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape results; missing ones are left out."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _devices() -> dict[str, Any]:
    """Devices, without initialising CUDA in the runner process (``is_available`` and
    ``device_count`` ask NVML; names come from ``nvidia-smi``): an initialised parent
    holds GPU memory and makes vLLM fall back to spawning its workers."""
    import torch

    cuda: dict[str, Any] = {"available": torch.cuda.is_available()}
    if cuda["available"]:
        cuda.update(count=torch.cuda.device_count(), gpus=_nvidia_smi(), cuda=torch.version.cuda)
    return {
        "cuda": cuda,
        "mps": torch.backends.mps.is_available(),
        "cpu_count": os.cpu_count(),
    }


def _nvidia_smi() -> list[str]:
    """``name, compute capability, driver`` of every GPU of the machine (empty if unknown)."""
    import subprocess

    query = ["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def _torch_numerics() -> dict[str, Any]:
    import torch

    return {
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "num_threads": torch.get_num_threads(),
    }


def environment_record() -> dict[str, Any]:
    """The record the manifest keeps (imports torch when it is installed)."""
    record: dict[str, Any] = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "selfalign": __version__,
        "packages": package_versions(),
        "env": {name: os.environ[name] for name in NUMERICS_ENV if name in os.environ},
    }
    if "torch" in record["packages"]:
        record["devices"] = _devices()
        record["torch"] = _torch_numerics()
    return record


def environment_hash(record: dict[str, Any]) -> str:
    """A short name for a record: equal records, equal names."""
    return stable_hash(record, length=12)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level of dotted keys (``packages.torch``)."""
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys (dotted: ``packages.torch``, ``env.OMP_NUM_THREADS``) whose values differ
    between two records, or that only one of them has."""
    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k, ...) != fb.get(k, ...))


def note_environment(manifest: dict[str, Any]) -> str:
    """Put the current record into a manifest's data: ``environment`` (the latest) and
    ``environments`` (every distinct record, by hash). Returns the hash, which the stage
    about to run keeps in its entry."""
    record = environment_record()
    key = environment_hash(record)
    manifest["environment"] = record
    manifest.setdefault("environments", {})[key] = record
    return key
