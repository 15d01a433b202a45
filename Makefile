# seresnet-stack: `make demo` (the main job), `make test` (the whole suite), `make bench` (side-by-side figures).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: venv demo test test-fast bench readme clean

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

# GPU self-check, one GPU, < 5 min: preflight, fp16/bf16 x torchvision/DALI, resume, DeepSpeed ZeRO-2 + SGD,
# ONNX export on GPU, img/s at batch 128 -> runs/gpu_check/gpu_check.json (docs/cluster.md section 9).
.PHONY: gpu-check
gpu-check: venv
	bash scripts/gpu_check.sh --out runs/gpu_check
