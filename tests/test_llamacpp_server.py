"""Scoring through a real third-party OpenAI-compatible server: llama-cpp-python's, serving
a GGUF of the tiny model (f32 weights, f32 KV cache) converted with llama.cpp's own
``convert_hf_to_gguf.py``. TruthfulQA through the openai backend must equal the hf backend
on the same weights. Needs ``make test-llamacpp`` (it builds .venv-llamacpp); skipped
elsewhere, CI included."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip(
    "llama_cpp.server", reason="llama-cpp-python[server] is not installed (make test-llamacpp)"
)

from selfalign.backends import BackendConfig, ScoreRequest, load_backend  # noqa: E402
from selfalign.backends.hf import HFBackend  # noqa: E402
from selfalign.cli import main  # noqa: E402
from selfalign.eval.truthfulqa import TARGET_DELIMITER, lm_eval_context, load_truthfulqa  # noqa: E402

CONVERTER = Path(os.environ.get("LLAMA_CPP_DIR", Path(sys.prefix) / "llama.cpp"))
KEY = "sk-selfalign-llamacpp-41be07"  # a made-up key; it must never reach a file
ENV = "SELFALIGN_LLAMACPP_KEY"
N_QUESTIONS = 25
GGML_TYPE_F32 = "0"  # for --type_k/--type_v: an f32 KV cache, so numerics match HF's

# convert_hf_to_gguf.py names the pre-tokenizer by hashing a tokenization of a fixed text
# and refuses hashes it does not know. The tiny model's tokenizer is a byte-level BPE
# with GPT-2's split regex, which llama.cpp calls "gpt-2"; test_gguf_tokenizes_like_hf
# checks that the result tokenizes as the HF tokenizer does.
CONVERT = """
import runpy, sys
from pathlib import Path
root = Path(sys.argv[1])
sys.path[:0] = [str(root), str(root / "gguf-py")]
from conversion import base
known = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
base.TextModel.get_vocab_base_pre = pre
sys.argv = [str(root / "convert_hf_to_gguf.py"), *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def gguf(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (CONVERTER / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"llama.cpp's converter not found in {CONVERTER} (make test-llamacpp)")
    out = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    done = subprocess.run(
        [sys.executable, "-c", CONVERT, str(CONVERTER), str(tiny_model),
         "--outfile", str(out), "--outtype", "f32"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m llama_cpp.server`` on a free port, behind an API key; yields the spec."""
    import httpx

    port = free_port()
    log = (tmp_path_factory.mktemp("server-log") / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "tiny",
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--api_key", KEY,
         "--type_k", GGML_TYPE_F32, "--type_v", GGML_TYPE_F32,
         "--n_threads", "2", "--n_threads_batch", "2"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"llama_cpp.server exited: see {log.name}"
            try:
                if httpx.get(
                    f"{url}/models", headers={"Authorization": f"Bearer {KEY}"}
                ).is_success:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"llama_cpp.server did not start: see {log.name}"
            time.sleep(0.5)
        yield f"openai:{url}#tiny"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(autouse=True)
def key_in_custom_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def truthfulqa_texts(shared_data: Path) -> list[tuple[str, str]]:
    questions = load_truthfulqa(shared_data / "truthfulqa" / "mc_task.json")[:N_QUESTIONS]
    return [
        (lm_eval_context(q.question), TARGET_DELIMITER + c)
        for q in questions
        for c in (*q.mc1_choices, *q.mc2_choices)
    ]


def test_gguf_tokenizes_like_hf(gguf: Path, tiny_model: Path, shared_data: Path) -> None:
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_model)
    vocab = Llama(str(gguf), vocab_only=True, verbose=False)
    texts = [c + k for c, k in truthfulqa_texts(shared_data)]
    texts += ["Über den Wolken, straße", "  two  spaces\n\n\n x", "I've 3.14 🚀 '''"]
    for text in texts:
        assert vocab.tokenize(text.encode(), add_bos=True, special=True) == hf(text).input_ids


def test_the_echo_leaves_bos_out_and_lists_the_generated_token(server: str) -> None:
    """What the openai backend must cope with (vLLM lists BOS; this server does not, yet
    counts it in usage.prompt_tokens): reading the prompt as the first prompt_tokens
    entries took the generated token's logprob into every score."""
    import httpx

    url = server.removeprefix("openai:").split("#")[0]
    body = {"model": "tiny", "prompt": "The capital of France is Paris", "echo": True,
            "logprobs": 1, "max_tokens": 1, "temperature": 0}  # fmt: skip
    resp = httpx.post(
        f"{url}/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ).json()
    lp, usage = resp["choices"][0]["logprobs"], resp["usage"]
    assert usage["completion_tokens"] == 1
    assert len(lp["tokens"]) == usage["prompt_tokens"]  # BOS left out, 1 generated added
    assert lp["tokens"][0] == "The" and lp["token_logprobs"][0] is None
    assert lp["text_offset"][-1] == len(body["prompt"])


def test_truthfulqa_through_llamacpp_equals_hf(
    server: str, tiny_model: Path, shared_data: Path, tmp_path: Path
) -> None:
    data = shared_data / "truthfulqa" / "mc_task.json"
    common = ["eval", "truthfulqa", "--data", str(data), "--limit", str(N_QUESTIONS)]
    served, local = tmp_path / "served", tmp_path / "hf"
    assert main([*common, "--model", server, "--api-key-env", ENV,
                 "--out", str(served / "result.json"), "--details", str(served / "rows.jsonl"),
                 "--run-dir", str(served / "run")]) == 0  # fmt: skip
    assert main([*common, "--model", str(tiny_model), "--dtype", "float32",
                 "--out", str(local / "result.json"), "--details", str(local / "rows.jsonl")]) == 0  # fmt: skip

    def read(folder: Path) -> tuple[dict[str, float], list[dict]]:
        result = json.loads((folder / "result.json").read_text())
        rows = [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines()]
        return {m["metric"]: m["value"] for m in result["metrics"]}, rows

    (got, got_rows), (want, want_rows) = read(served), read(local)
    assert got["mc1"] == want["mc1"]
    assert [r["mc1_correct"] for r in got_rows] == [r["mc1_correct"] for r in want_rows]
    assert got["mc2"] == pytest.approx(want["mc2"], abs=5e-4)
    lls = [(a, b) for g, w in zip(got_rows, want_rows, strict=True)
           for a, b in zip(g["mc1_lls"] + g["mc2_lls"], w["mc1_lls"] + w["mc2_lls"], strict=True)]  # fmt: skip
    assert len(lls) > 5 * N_QUESTIONS
    assert max(abs(a - b) for a, b in lls) < 1e-3, "per-choice log-likelihoods differ"
    files = [p for p in served.rglob("*") if p.is_file()]
    assert len(files) == 3 and not [p for p in files if KEY.encode() in p.read_bytes()]


def test_token_id_prompts_fall_back_to_text(
    server: str, tiny_model: Path, shared_data: Path
) -> None:
    """With ``tokenizer`` set the backend sends token ids; this server takes text only, so
    the backend sends the text instead and the scores still equal the hf backend's."""
    requests = [ScoreRequest(c, k) for c, k in truthfulqa_texts(shared_data)[:12]]
    requests += [ScoreRequest("Question: 2 + 2 = ", "4"), ScoreRequest("Über den", " Wolken")]
    config = BackendConfig(model=server, api_key_env=ENV, tokenizer=str(tiny_model))
    with load_backend(config) as backend:
        got = backend.score(requests)
    want = HFBackend(tiny_model, dtype="float32", device="cpu").score(requests)
    assert got == pytest.approx(want, abs=1e-3)
