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
    the file's folder; built from CLI options, they are left to the working directory.

    Cost (all optional; none changes an output, so none is part of a fingerprint; see
    ``selfalign.cost``): ``price_per_million_prompt_tokens`` and
    ``price_per_million_completion_tokens`` price a hosted API by its tokens;
    ``price_per_device_hour`` prices your own GPUs or cloud instances by the hours the
    backend holds them: ``devices`` of them, by default 1 for hf, ``tensor_parallel_size``
    for vllm and 0 for openai (a remote server: give ``devices`` when you pay for its
    machines by the hour). A backend with a token price is charged by its tokens only.
    Training stages run on the run's own devices: ``launch.num_processes`` of them (1 for
    MoTE), charged at the run-level block's ``price_per_device_hour``. The amounts are in
    whatever currency the prices are. ``throughput_tokens_per_s``: your measured
    generation speed (completion tokens per second), used only by ``run --dry-run`` to
    turn its token estimates into time."""

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

    # cost and estimates (see the docstring)
    price_per_million_prompt_tokens: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="hosted API: price of 1M prompt tokens"
    )
    price_per_million_completion_tokens: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="hosted API: price of 1M generated tokens"
    )
    price_per_device_hour: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="own GPUs/instances: price of one device-hour"
    )
    devices: int | None = Field(
        None, ge=0, description="devices the backend holds (default: hf 1, vllm TP, openai 0)"
    )
    throughput_tokens_per_s: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="measured generation speed, completion tokens/s (dry-run estimates only)",
    )  # fmt: skip

    # Settings that change only speed, never outputs: left out of stage fingerprints.
    # (A ClassVar, not a field: a field would be dumped into config.yaml and hashed.)
    EXECUTION_ONLY: ClassVar[frozenset[str]] = frozenset(
        {
            "batch_size", "device", "api_key_env", "base_urls", "max_concurrency",
            "timeout_s", "max_retries", "retry_backoff_s", "tensor_parallel_size",
            "gpu_memory_utilization", "max_model_len", "enable_prefix_caching",
            "enforce_eager", "price_per_million_prompt_tokens",
            "price_per_million_completion_tokens", "price_per_device_hour", "devices",
            "throughput_tokens_per_s",
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
