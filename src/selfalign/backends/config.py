"""Backend options (one block in a config) and the factory that builds a backend."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from selfalign.backends.spec import resolve_local_spec
from selfalign.validation import ConfigPath, StrictModel


def _resolve_model(spec: str, info: ValidationInfo) -> str:
    """Inside a config file, local paths resolve against the file's folder and must exist."""
    base = (info.context or {}).get("base_dir")
    if base is None:
        return spec
    return resolve_local_spec(spec, Path(base))


class BackendConfig(StrictModel):
    """Where generation runs. Change this block to move a stage to another backend.

    In a config file, local paths (``model``, ``adapter``, ``tokenizer``) resolve against
    the file's folder; built from CLI options, they are left to the working directory."""

    model: Annotated[str, AfterValidator(_resolve_model)] = Field(
        description="model spec: PATH, hf:PATH, vllm:PATH or openai:URL#NAME"
    )
    batch_size: int = Field(8, ge=1, description="hf: rows decoded together")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    adapter: ConfigPath | None = Field(None, description="LoRA adapter directory applied on top")

    # openai: any OpenAI-compatible server.
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="openai: NAME of the environment variable holding the API key "
        "(the key itself never goes in a config)",
    )
    base_urls: list[str] = Field(
        default_factory=list,
        description="openai: more endpoints serving the same model; requests spread over all",
    )
    max_concurrency: int = Field(16, ge=1, description="openai: requests in flight per endpoint")
    timeout_s: float = Field(120.0, gt=0, description="openai: per-request timeout")
    max_retries: int = Field(6, ge=0, description="openai: retries on 429, 5xx, timeouts, bad JSON")
    retry_backoff_s: float = Field(1.0, ge=0, description="openai: first backoff (x2, jittered)")
    tokenizer: ConfigPath | None = Field(
        None,
        description="openai: the served model's tokenizer directory (logit_bias by text, "
        "scoring with exact lm-eval token boundaries)",
    )
    server_no_repeat_ngram: bool = Field(
        False,
        description="openai: the server is `vllm serve` with --logits-processors "
        "selfalign.backends.vllm_logits:NoRepeatNGram, so the n-gram rules "
        "(no_repeat_ngram_size, ngram_penalties) can be sent",
    )

    # vllm: the offline engine.
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs one model is split over")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm: share of GPU memory")
    max_model_len: int | None = Field(None, ge=1, description="vllm: context length limit")
    enable_prefix_caching: bool = Field(True, description="vllm: reuse KV of shared prefixes")
    enforce_eager: bool = Field(
        False, description="vllm: skip graph capture/compilation (faster start, slower decode)"
    )

    # Settings that change only speed, never outputs: left out of stage fingerprints.
    # (A ClassVar, not a field: a field would be dumped into config.yaml and hashed.)
    EXECUTION_ONLY: ClassVar[frozenset[str]] = frozenset(
        {
            "batch_size", "device", "api_key_env", "base_urls", "max_concurrency",
            "timeout_s", "max_retries", "retry_backoff_s", "tensor_parallel_size",
            "gpu_memory_utilization", "max_model_len", "enable_prefix_caching",
            "enforce_eager",
        }
    )  # fmt: skip

    @field_validator("base_urls")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"base_urls: expected http(s)://..., got {url!r}")
        return urls

    def fingerprint_data(self) -> dict[str, object]:
        return {k: v for k, v in self.model_dump().items() if k not in self.EXECUTION_ONLY}
