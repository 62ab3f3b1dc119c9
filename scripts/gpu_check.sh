#!/usr/bin/env bash
# The one-shot GPU speed check (issue #17): install the wheels `make gpu-wheels` put in
# .whl/ (no network needed), then run scripts/gpu_check.py with src/ on PYTHONPATH.
#
#   here:            make gpu-wheels
#   on the GPU box:  scripts/gpu_check.sh            (carry .whl; JSON: $OUT/gpu_check.json)
#   here, on CPU:    scripts/gpu_check.sh --cpu-smoke
#
# PYTHON picks the interpreter (default: .venv/bin/python if there, else python3).
# GPU_CHECK_SITE is where the wheels go (default /tmp/gpu_check_site); nothing is
# installed into the interpreter's own site-packages.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
ver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
echo "gpu_check.sh: $("$PYTHON" --version 2>&1) at $(command -v "$PYTHON") (the GPU machine had 3.12)"

if compgen -G ".whl/*.whl" >/dev/null; then
    tag="cp${ver/./}"
    if ! compgen -G ".whl/pydantic_core-*-${tag}-*.whl" >/dev/null; then
        echo "gpu_check.sh: .whl/ has no compiled wheels for Python $ver;" \
            "run here: make gpu-wheels GPU_PY_VERSIONS=\"$ver\"" >&2
        exit 2
    fi
    site="${GPU_CHECK_SITE:-/tmp/gpu_check_site}"
    # one name per wheel: pip picks the file that fits this interpreter
    names=$(for f in .whl/*.whl; do basename "$f" | cut -d- -f1; done | sort -u)
    echo "gpu_check.sh: installing into $site:" $names
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --disable-pip-version-check --target "$site" --find-links .whl $names
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "gpu_check.sh: no .whl/ (make gpu-wheels): using $PYTHON's own packages"
fi
export PYTHONPATH="$PWD/src:$PYTHONPATH"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" scripts/gpu_check.py "$@"
