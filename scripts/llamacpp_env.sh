#!/usr/bin/env bash
# Builds VENV (default .venv-llamacpp) with llama-cpp-python and its OpenAI-compatible
# server, for tests/test_llamacpp_server.py (`make test-llamacpp`): scoring through a
# third-party server must equal the hf backend. llama-cpp-python compiles llama.cpp from
# its source distribution on the CPU (5 to 15 minutes on 2 cores); the same sdist carries
# llama.cpp's HF -> GGUF converter, kept as VENV/llama.cpp/ for the tests.
set -euo pipefail
VENV=${1:-.venv-llamacpp}
PYTHON=${PYTHON:-python3.11}
LLAMA_CPP=${LLAMA_CPP:-llama-cpp-python==0.3.36}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}

"$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
"$py" -m pip install -q --upgrade pip
# torch first, pinned: the CPU wheel is found locally; an unpinned torch pulls CUDA packages.
"$py" -m pip install -q torch==2.13.0
"$py" -m pip install -q -e '.[dev]'

src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
"$py" -m pip download -q --no-deps --no-binary :all: -d "$src" "$LLAMA_CPP"
sdist=$(ls "$src"/llama_cpp_python-*.tar.gz)
if ! "$py" -c "import llama_cpp.server" 2>/dev/null; then
    nice -n 10 "$py" -m pip install -q "llama-cpp-python[server] @ file://$sdist"
fi
# The converter's own requirement (it tries a SentencePiece vocabulary first).
"$py" -m pip install -q sentencepiece
tar -xzf "$sdist" -C "$src"
rm -rf "$VENV/llama.cpp"
mkdir -p "$VENV/llama.cpp"
vendor=$(ls -d "$src"/llama_cpp_python-*/vendor/llama.cpp)
# convert_hf_to_gguf.py imports the gguf-py beside it (newer than gguf on PyPI).
cp -r "$vendor/convert_hf_to_gguf.py" "$vendor/gguf-py" "$VENV/llama.cpp/"
[ -d "$vendor/conversion" ] && cp -r "$vendor/conversion" "$VENV/llama.cpp/"
"$py" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
