#!/usr/bin/env bash
# `make gpu-bundle`: write .gpu/, the wheels scripts/gpu_check.sh --device installs (pip --no-index) on a GPU
# machine with no network. Exactly what the check imports and that machine lacks (its packages are listed in
# docs/cluster.md, "On a GPU: the self-check"): pydantic with its compiled core (for CPython 3.12, the GPU
# machine's, and 3.11, this project's, for the simulation), annotated-types, typing-inspection and
# typing-extensions at the versions pydantic needs, hjson, and DeepSpeed built here as a wheel (pure Python: its
# ops are compiled at first use). No torch. Versions are the ones installed in .venv, so the bundle is what the
# tests here ran. Refuses to finish over 48 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${GPU_BUNDLE:-.gpu}
LIMIT_MIB=48
[ -x "$PY" ] || { echo "gpu-bundle: $PY not found; run 'make venv' first." >&2; exit 2; }

ver() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
PINS=()
for name in pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson; do
  PINS+=("$name==$(ver "$name")")
done
DS_VERSION=$(ver deepspeed)

rm -rf "$OUT.tmp" && mkdir -p "$OUT.tmp"
for pyver in 3.12 3.11; do
  "$PY" -m pip download -qq --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$OUT.tmp" "${PINS[@]}"
done
# DeepSpeed publishes only an sdist; build it against the torch in .venv (no build isolation: its setup.py imports
# torch), with no op compiled ahead (DS_BUILD_OPS=0, its default): a py3-none-any wheel.
DS_BUILD_OPS=0 "$PY" -m pip wheel -qq --no-deps --no-build-isolation -w "$OUT.tmp" "deepspeed==$DS_VERSION"
ls "$OUT.tmp"/deepspeed-*-py3-none-any.whl >/dev/null

size_kib=$(du -sk "$OUT.tmp" | cut -f1)
if (( size_kib > LIMIT_MIB * 1024 )); then
  echo "gpu-bundle: $OUT is $((size_kib / 1024)) MiB, over the $LIMIT_MIB MiB that may travel with the check." >&2
  exit 1
fi
{
  echo "Made by 'make gpu-bundle' (scripts/gpu_bundle.sh) on $(date -u +%Y-%m-%dT%H:%MZ) with $("$PY" --version 2>&1):"
  echo "pip download --no-deps --only-binary=:all: for cp312 and cp311 manylinux x86_64 of ${PINS[*]};"
  echo "pip wheel --no-deps --no-build-isolation deepspeed==$DS_VERSION (DS_BUILD_OPS=0). Installed by"
  echo "scripts/gpu_check.sh --device with pip install --no-index --no-deps --find-links .gpu --target <tmp>."
} > "$OUT.tmp/README"
printf '%s\n' "${PINS[@]%%==*}" deepspeed > "$OUT.tmp/requirements.txt"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
echo "gpu-bundle: $OUT, $(du -sh "$OUT" | cut -f1): $(cd "$OUT" && ls *.whl | tr '\n' ' ')"
