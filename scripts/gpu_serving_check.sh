#!/usr/bin/env bash
# GPU serving check, for a machine with an NVIDIA GPU and the pinned TensorRT (train/compat.yaml `serving:`;
# `pip install -e '.[tensorrt]'` for polygraphy, trtexec from the TensorRT container of the same release):
#   1. builds fp16 (from the fp16-typed copy) and int8 (from a Q/DQ ONNX if there is one) plans with the one recipe of
#      serve/tensorrt.py (profile min 1 / opt / max = the largest batch asked for), and loads each at max batch;
#   2. compares each plan with ONNX Runtime on the same random inputs (polygraphy, --atol/--rtol);
#   3. times batch 1/8/32 with trtexec and writes everything as JSON to runs/gpu_check/report.json.
# Not run on the CPU development machines (no GPU); tests/test_build_plans.py checks its syntax, argument errors
# and the commands of --dry-run, which prints every command without running any and needs no GPU.
#
# usage: scripts/gpu_serving_check.sh [--onnx runs/export/model.onnx] [--int8-onnx runs/export/model.int8.onnx]
#        [--out runs/gpu_check] [--batches "1 8 32"] [--fp16-atol 5e-3] [--int8-atol 5e-2] [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
ONNX=runs/export/model.onnx
INT8_ONNX=""
OUT=runs/gpu_check
BATCHES="1 8 32"
FP16_ATOL=5e-3
INT8_ATOL=5e-2
DRY=0
PY=${PYTHON:-.venv/bin/python}
die() { echo "gpu_serving_check: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --onnx) ONNX=${2:?}; shift 2;;
    --int8-onnx) INT8_ONNX=${2:?}; shift 2;;
    --out) OUT=${2:?}; shift 2;;
    --batches) BATCHES=${2:?}; shift 2;;
    --fp16-atol) FP16_ATOL=${2:?}; shift 2;;
    --int8-atol) INT8_ATOL=${2:?}; shift 2;;
    --dry-run) DRY=1; shift;;
    -h|--help) sed -n '2,14p' "$0"; exit 0;;
    *) die "unknown argument '$1'; see --help.";;
  esac
done
[ -x "$PY" ] || PY=python3
[ -f "$ONNX" ] || die "ONNX model '$ONNX' does not exist; run 'python -m serve export' first or pass --onnx."
if [ -z "$INT8_ONNX" ] && [ -f "$(dirname "$ONNX")/model.int8.onnx" ]; then INT8_ONNX="$(dirname "$ONNX")/model.int8.onnx"; fi
for b in $BATCHES; do [[ "$b" =~ ^[1-9][0-9]*$ ]] || die "--batches must be positive integers, got '$b'."; done
MAX=$(printf '%s\n' $BATCHES | sort -n | tail -n 1)
SIZE=$("$PY" -m serve.tensorrt --print-image-size "$ONNX")
TRTEXEC=$(command -v trtexec || true)
for t in /opt/trtexec/bin/trtexec /usr/src/tensorrt/bin/trtexec; do [ -n "$TRTEXEC" ] || { [ -x "$t" ] && TRTEXEC=$t; } || true; done
WANT_TAG=$("$PY" -c "from train.compat import load_table as t; s = t()['serving']; print(s['rows'][s['current']]['tensorrt_tag'])")

run() {  # echo the command; run it unless --dry-run
  echo "+ $*"
  [ "$DRY" = 1 ] || "$@"
}

if [ "$DRY" = 0 ]; then
  command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null || die "no GPU visible (nvidia-smi); run this on a GPU machine."
  [ -n "$TRTEXEC" ] || die "trtexec not found; use the TensorRT container of train/compat.yaml serving (nvcr.io/nvidia/tensorrt) or put trtexec on PATH."
  got=$("$TRTEXEC" --help 2>&1 | sed -n 's/.*\[TensorRT v\([0-9]*\)\].*/\1/p' | head -n 1)
  [ "$got" = "$WANT_TAG" ] || die "trtexec is TensorRT v$got but the pinned Triton loads v$WANT_TAG plans only; use the matching TensorRT."
  command -v polygraphy >/dev/null || die "polygraphy not found; pip install -e '.[tensorrt]'."
fi
TRTEXEC=${TRTEXEC:-trtexec}
mkdir -p "$OUT"
precisions="fp16"
[ -n "$INT8_ONNX" ] && precisions="fp16 int8"
CMP_B=$(printf '%s\n' $BATCHES | awk '$1 > 1' | head -n 1); CMP_B=${CMP_B:-$MAX}
results=()
status=0
for p in $precisions; do
  src=$ONNX; ref=$ONNX; atol=$FP16_ATOL
  [ "$p" = int8 ] && { src=$INT8_ONNX; ref=$INT8_ONNX; atol=$INT8_ATOL; }
  if [ "$p" = fp16 ]; then   # TensorRT 11 builds the ONNX's own types: fp16 from the fp16-typed copy
    src="$OUT/model.fp16.onnx"
    run "$PY" -m serve.tensorrt --fp16-onnx "$ONNX" "$src"
  fi
  plan="$OUT/model.$p.plan"
  # shellcheck disable=SC2086
  build=$("$PY" -m serve.tensorrt --print-command "$src" --plan "$plan" --precision "$p" --max-batch "$MAX" \
          --preferred $BATCHES --image-size "$SIZE" --trtexec "$TRTEXEC")
  t0=$(date +%s)
  echo "+ $build"
  [ "$DRY" = 1 ] || eval "$build" > "$OUT/build.$p.log" 2>&1 || die "the $p build failed; see $OUT/build.$p.log."
  build_s=$(( $(date +%s) - t0 ))
  verify=$("$PY" -m serve.tensorrt --print-verify "$plan" --max-batch "$MAX" --image-size "$SIZE" --trtexec "$TRTEXEC")
  echo "+ $verify"
  [ "$DRY" = 1 ] || eval "$verify" > "$OUT/verify.$p.log" 2>&1 || die "the $p plan does not run at batch $MAX; see $OUT/verify.$p.log."
  shape="input:[$CMP_B,3,$SIZE,$SIZE]"
  run polygraphy run "$ref" --onnxrt --input-shapes "$shape" --val-range "input:[-2.2,2.7]" \
      --save-inputs "$OUT/inputs.$p.json" --save-outputs "$OUT/ort.$p.json"
  cmp=pass
  run polygraphy run "$plan" --model-type engine --trt --load-inputs "$OUT/inputs.$p.json" \
      --load-outputs "$OUT/ort.$p.json" --atol "$atol" --rtol 1e-2 || { cmp=fail; status=1; }
  for b in $BATCHES; do
    timing=("$TRTEXEC" --loadEngine="$plan" --shapes="input:${b}x3x${SIZE}x${SIZE}" --warmUp=500 --duration=10)
    echo "+ ${timing[*]}"
    [ "$DRY" = 0 ] || continue
    "${timing[@]}" > "$OUT/time.$p.b$b.log" 2>&1 || die "timing $p at batch $b failed; see $OUT/time.$p.b$b.log."
    perf=$("$PY" -m serve.tensorrt --parse-perf "$OUT/time.$p.b$b.log")
    results+=("{\"precision\": \"$p\", \"batch\": $b, \"perf\": $perf, \"plan_bytes\": $(stat -c %s "$plan"), \"build_s\": $build_s, \"polygraphy\": \"$cmp\", \"atol\": $atol}")
  done
done
if [ "$DRY" = 0 ]; then
  gpu=$(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader | head -n 1)
  printf '{"gpu": "%s", "tensorrt": "v%s", "image_size": %s, "compare_batch": %s, "runs": [%s]}\n' \
    "$gpu" "$WANT_TAG" "$SIZE" "$CMP_B" "$(IFS=,; echo "${results[*]}")" > "$OUT/report.json"
  echo "wrote $OUT/report.json"
fi
exit $status
