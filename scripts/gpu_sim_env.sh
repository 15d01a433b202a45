#!/usr/bin/env bash
# The GPU machine's Python, recreated on a CPU box for the device-mode simulation of scripts/gpu_check.sh
# (tests/test_gpu_check_sim.py): a venv holding ONLY what the lent GPU machine has and the check uses, at the
# machine's versions: torch 2.11.0 (the registry's CUDA 13 build with its nvidia-* wheels: it runs on a CPU),
# torchvision 0.26.0, numpy 2, pillow, onnx, onnxruntime, onnxscript, tqdm, pyyaml, psutil, prometheus-client,
# matplotlib and DeepSpeed's own needs that machine has (einops, msgpack, ninja, packaging, py-cpuinfo,
# nvidia-ml-py). No pydantic, hjson or DeepSpeed: the check brings those from .gpu/ (make gpu-bundle), as there.
# Idempotent (a stamp keyed on the package list); prints the venv's python. Measured on this project's 2-core box
# (2026-12-02, PyPI over the network): 149 s and 4.9 GiB on the first run, 0 s after.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GPU_SIM_VENV:-.cache/gpu-sim-venv}
PY=${PYTHON:-python3}
PACKAGES=(torch==2.11.0 torchvision==0.26.0 "numpy>=2,<3" "pillow>=10" "onnx>=1.18" "onnxruntime>=1.20" "onnxscript>=0.3"
          tqdm pyyaml psutil prometheus-client matplotlib einops msgpack ninja packaging py-cpuinfo nvidia-ml-py)
stamp="$VENV/.installed-$(echo "${PACKAGES[*]}" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[gpu-sim] creating $VENV (torch 2.11.0 with its CUDA wheels: a few minutes, ~5 GiB)" >&2
  t0=$(date +%s)
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  # torch 2.11.0 is not among this project's local wheels: it comes from the registry (PyPI's default build is
  # the CUDA 13.0 one, as on the GPU machine).
  "$VENV/bin/pip" install -q --no-cache-dir "${PACKAGES[@]}" >&2
  for mod in pydantic hjson deepspeed; do
    if "$VENV/bin/python" -c "import $mod" 2>/dev/null; then
      echo "[gpu-sim] $mod got into $VENV; the GPU machine has none" >&2; exit 1
    fi
  done
  rm -f "$VENV"/.installed-*
  touch "$stamp"
  echo "[gpu-sim] ready in $(( $(date +%s) - t0 )) s, $(du -sh "$VENV" | cut -f1)" >&2
fi
echo "$PWD/$VENV/bin/python"
