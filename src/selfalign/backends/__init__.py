"""Generation backends behind one interface (see ``base.Backend``)."""

from __future__ import annotations

from pathlib import Path

from selfalign.backends.base import (
    Backend,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    ScoreRequest,
)
from selfalign.backends.config import BackendConfig
from selfalign.backends.spec import ModelSpec, parse_spec
from selfalign.errors import InputError

__all__ = [
    "Backend",
    "BackendConfig",
    "GenerationRequest",
    "GenerationResult",
    "ModelSpec",
    "SamplingParams",
    "ScoreRequest",
    "load_backend",
    "parse_spec",
]


def load_backend(config: BackendConfig | str) -> Backend:
    """Build the backend a spec names; optional engines are imported only when chosen."""
    if isinstance(config, str):
        config = BackendConfig(model=config)
    spec = parse_spec(config.model)
    if spec.kind in ("hf", "vllm") and _is_mote(spec.path):
        # never the bare base model underneath: the experts route per token
        if spec.kind == "vllm" or config.adapter:
            raise InputError(
                "a MoTE model runs on the hf backend with no adapter (its experts route per "
                "token); give the directory itself, or serve an export_merged_step copy",
                field="model",
            )
        from selfalign.mote.backend import MoteBackend

        return MoteBackend(
            spec.path, batch_size=config.batch_size, dtype=config.dtype, device=config.device
        )
    if spec.kind == "hf":
        if not spec.path.exists():
            raise InputError("model directory does not exist", file=spec.path)
        from selfalign.backends.hf import HFBackend

        return HFBackend(
            spec.path,
            batch_size=config.batch_size,
            dtype=config.dtype,
            device=config.device,
            adapter=config.adapter,
        )
    if spec.kind == "openai":
        from selfalign.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(
            [spec.base_url, *config.base_urls],
            spec.name,
            api_key_env=config.api_key_env,
            max_concurrency=config.max_concurrency,
            timeout_s=config.timeout_s,
            max_retries=config.max_retries,
            retry_backoff_s=config.retry_backoff_s,
            tokenizer=config.tokenizer,
            server_no_repeat_ngram=config.server_no_repeat_ngram,
        )
    if spec.kind == "vllm":
        if not spec.path.exists():
            raise InputError("model directory does not exist", file=spec.path)
        from selfalign.backends.vllm_backend import VLLMBackend

        return VLLMBackend(
            spec.path,
            dtype=config.dtype,
            adapter=config.adapter,
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_model_len=config.max_model_len,
            enable_prefix_caching=config.enable_prefix_caching,
            enforce_eager=config.enforce_eager,
        )
    raise InputError(f"unknown backend {spec.kind!r}", field="model")


def _is_mote(path: Path | None) -> bool:
    from selfalign.mote.config import is_mote_dir

    return path is not None and path.is_dir() and is_mote_dir(path)
