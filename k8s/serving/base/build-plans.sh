#!/bin/sh
# Init container: copy the shipped Triton repository to a writable volume and, for each model named in
# PLAN_MODELS, build a TensorRT plan from its ONNX with trtexec ON THIS GPU, cached per GPU model and
# TensorRT version (plans are not portable across either). A model whose plan cannot be built keeps
# its ONNX file and config, so the server always starts (DESIGN.md decision 3).
#   SRC_REPOSITORY  shipped repository (read-only, in the image)      default /models
#   DST_REPOSITORY  repository Triton serves (emptyDir)                default /repository
#   PLAN_CACHE      cache volume                                       default /plan-cache
#   PLAN_MODELS     space/comma separated model names                  default se_resnet50
#   PLAN_SHAPES     min,opt,max batch of the optimisation profile      default 1,8,32
#   PLAN_PRECISION  fp16 | fp32                                        default fp16
set -eu
SRC=${SRC_REPOSITORY:-/models}
DST=${DST_REPOSITORY:-/repository}
CACHE=${PLAN_CACHE:-/plan-cache}
MODELS=$(echo "${PLAN_MODELS:-se_resnet50}" | tr ',' ' ')
SHAPES=${PLAN_SHAPES:-1,8,32}
PRECISION=${PLAN_PRECISION:-fp16}

log() { echo "[build-plans] $*"; }

cp -R "$SRC"/. "$DST"/
log "copied repository $SRC -> $DST"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  log "no GPU visible: serving the ONNX models"; exit 0
fi
TRTEXEC=$(command -v trtexec || true)
[ -n "$TRTEXEC" ] || { [ -x /usr/src/tensorrt/bin/trtexec ] && TRTEXEC=/usr/src/tensorrt/bin/trtexec; } || true
if [ -z "$TRTEXEC" ]; then log "trtexec not found: serving the ONNX models"; exit 0; fi

gpu=$(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader | head -n 1 | tr -c 'A-Za-z0-9.\n' '_' | tr -s '_')
# trtexec's banner: "&&&& RUNNING TensorRT.trtexec [TensorRT v100500] ..."
trt=$("$TRTEXEC" --help 2>&1 | sed -n 's/.*\[TensorRT v\([0-9]*\)\].*/\1/p' | head -n 1)
[ -n "$trt" ] || trt=unknown
min=$(echo "$SHAPES" | cut -d, -f1); opt=$(echo "$SHAPES" | cut -d, -f2); max=$(echo "$SHAPES" | cut -d, -f3)
log "gpu=$gpu tensorrt=$trt profile batch=$min/$opt/$max precision=$PRECISION"

for model in $MODELS; do
  dir="$DST/$model"
  onnx="$dir/1/model.onnx"
  if [ ! -f "$onnx" ]; then log "$model: no $onnx, skipped"; continue; fi
  # Input name and per-sample dims from config.pbtxt's first input block, in either text-format style:
  #   input { name: "input" ... dims: 3 dims: 224 dims: 224 }   or   input [ { name: "x" dims: [ 3, 224, 224 ] } ]
  read -r input dims <<EOF_AWK
$(awk '
    /^input/ { inb = 1; next }
    inb && /^[]}]/ { exit }
    inb && /name:/ && name == "" { if (match($0, /"[^"]*"/)) name = substr($0, RSTART + 1, RLENGTH - 2) }
    inb && /dims:/ { v = $0; sub(/.*dims: */, "", v); gsub(/[][ ]/, "", v); gsub(/,/, "x", v); dims = (dims == "" ? v : dims "x" v) }
    END { print name, dims }' "$dir/config.pbtxt")
EOF_AWK
  if [ -z "$input" ] || [ -z "$dims" ]; then log "$model: cannot read input name/dims from config.pbtxt, serving ONNX"; continue; fi
  sha=$(sha256sum "$onnx" | cut -c1-16)
  plan="$CACHE/$gpu/trt-$trt/$model/$sha-$PRECISION-$SHAPES.plan"
  if [ -s "$plan" ]; then
    log "$model: cached plan $plan"
  else
    mkdir -p "$(dirname "$plan")"
    tmp="$plan.tmp.$$"
    flags=""; [ "$PRECISION" = fp16 ] && flags="--fp16"
    log "$model: building $plan"
    if "$TRTEXEC" --onnx="$onnx" --saveEngine="$tmp" $flags \
         --minShapes="$input:${min}x$dims" --optShapes="$input:${opt}x$dims" --maxShapes="$input:${max}x$dims" \
         > "$tmp.log" 2>&1 && [ -s "$tmp" ]; then
      mv "$tmp" "$plan"          # atomic: a concurrent pod never sees half a plan
      rm -f "$tmp.log"
    else
      log "$model: trtexec failed, serving ONNX; last lines:"; tail -n 20 "$tmp.log" || true
      rm -f "$tmp" "$tmp.log"; continue
    fi
  fi
  cp "$plan" "$dir/1/model.plan"
  rm -f "$onnx"
  sed -i -e 's/^platform: *"onnxruntime_onnx"/platform: "tensorrt_plan"/' \
         -e 's/^backend: *"onnxruntime"/platform: "tensorrt_plan"/' \
         -e '/^default_model_filename/d' "$dir/config.pbtxt"
  log "$model: serving TensorRT plan"
done
