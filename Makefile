# seresnet-stack: `make demo` (the main job), `make test` (the whole suite), `make bench` (side-by-side figures).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: venv demo test test-fast bench readme clean wheel

venv:
	@bash scripts/setup_env.sh

demo: venv
	$(PY) -m scripts.demo

test: venv
	$(PY) -m pytest -v --durations=25 tests

test-fast: venv
	$(PY) -m pytest -v -m "not slow" tests

bench: venv
	$(PY) -m scripts.bench

clean:
	rm -rf runs .cache

readme: venv
	$(PY) -m scripts.readme

# The installable package, dist/seresnet_stack-<version>-py3-none-any.whl (the `seresnet` command, packaged configs,
# compat.yaml and the manifests `seresnet launch k8s` renders from). Install it with the tested versions:
#   pip install -c constraints.txt dist/seresnet_stack-*.whl
wheel: venv
	$(PY) -m pip wheel --no-deps --no-build-isolation -w dist .

# GPU self-check, one GPU, <= 420 s: facts, preflight, Trainer vs plain-loop img/s, kill + resume to equal weights,
# DeepSpeed ZeRO-1/2 bf16 memory and fp16 overflow, ONNX on the GPU, torch.compile -> runs/gpu_check/gpu_check.json
# (docs/cluster.md section 9). On a lent GPU machine with no network: `bash scripts/gpu_check.sh --device` after
# `make gpu-bundle` here (.gpu/: the wheels that machine lacks).
.PHONY: gpu-check gpu-bundle
gpu-check: venv
	bash scripts/gpu_check.sh --out runs/gpu_check

gpu-bundle: venv
	bash scripts/gpu_bundle.sh
