#!/bin/sh
# Init container: copy the shipped Triton repository to a writable volume and, for each model named in
# PLAN_MODELS, build a TensorRT plan from its ONNX with trtexec ON THIS GPU, then swap it in. The recipe
# (profile, trtexec argv, plan file name) is the rendered block below, generated from serve/tensorrt.py.
#
#   - Profile from the model's config.pbtxt (written from the training config's `serve:` section): min 1,
#     opt = the largest preferred_batch_size, max = max_batch_size. Triton refuses a plan whose max batch is
#     below max_batch_size, so the built plan is first loaded and run at max batch; only then is it cached
#     and does it replace the ONNX (kept until that moment).
#   - Plans are cached on a ReadWriteMany volume per GPU model, TensorRT version, ONNX checksum, precision and
#     profile. Concurrent pods: one builds under a lock (mkdir, with an owner file, a heartbeat and stale-lock
#     recovery), the others wait; temp files carry hostname+pid+random; an entry is the plan plus its sha256,
#     verified on every reuse (a bad entry is rebuilt).
#   - A failed build is never silent: a log line, plan-status.json in the served repository, and the init
#     container's termination message (kubectl describe pod). PLAN_FAILURE_POLICY=fail stops the pod (it
#     cannot serve a slow ONNX fallback unnoticed); fallback serves the ONNX model.
#
#   SRC_REPOSITORY        shipped repository (read-only, in the image)        default /models
#   DST_REPOSITORY        repository Triton serves (emptyDir)                 default /repository
#   PLAN_CACHE            cache volume                                        default /plan-cache
#   PLAN_MODELS           space/comma separated model names                   default se_resnet50
#   PLAN_PRECISION        fp32 | fp16 | int8 (int8: the ONNX must carry Q/DQ) default fp16
#   PLAN_FAILURE_POLICY   fail | fallback                                     default fail
#   PLAN_TENSORRT_VERSION trtexec's version tag the server's TensorRT needs, e.g. 100500 (empty: not checked)
#   PLAN_LOCK_WAIT_S      how long to wait for another pod's build            default 1800
#   PLAN_LOCK_STALE_S     a lock without a heartbeat for this long is broken  default 120
#   PLAN_TERMINATION_LOG  where the summary goes                              default /dev/termination-log
set -eu
SRC=${SRC_REPOSITORY:-/models}
DST=${DST_REPOSITORY:-/repository}
CACHE=${PLAN_CACHE:-/plan-cache}
MODELS=$(echo "${PLAN_MODELS:-se_resnet50}" | tr ',' ' ')
PRECISION=${PLAN_PRECISION:-fp16}
POLICY=${PLAN_FAILURE_POLICY:-fail}
WANT_TRT=${PLAN_TENSORRT_VERSION:-}
LOCK_WAIT_S=${PLAN_LOCK_WAIT_S:-1800}
LOCK_STALE_S=${PLAN_LOCK_STALE_S:-120}
HEARTBEAT_S=$(( LOCK_STALE_S / 4 > 0 ? LOCK_STALE_S / 4 : 1 ))
TERMINATION_LOG=${PLAN_TERMINATION_LOG:-/dev/termination-log}
HOST=$(hostname 2>/dev/null || cat /etc/hostname 2>/dev/null || echo pod)
STATUS="$DST/plan-status.json"

log() { echo "[build-plans] $*"; }

# >>> rendered by `python -m serve.tensorrt --write-k8s` from serve/tensorrt.py: do not edit by hand
PLAN_PRECISIONS="fp32 fp16 int8"
CLASSIFIER_MODEL="se_resnet50"
# plan_file CC: the per-GPU plan file name (serve.contract.plan_filename).
plan_file() { echo "model.sm$(echo "$1" | tr -d '.').plan"; }
# plan_profile MAX PREFERRED...: min opt max (serve.tensorrt.plan_profile).
plan_profile() {
  max=$1; shift; opt=""
  for b in "$@"; do [ "$b" -ge 1 ] && [ "$b" -le "$max" ] && { [ -z "$opt" ] || [ "$b" -gt "$opt" ]; } && opt=$b; done
  echo "1 ${opt:-$max} $max"
}
precision_flags() {
  case "$1" in
    fp32) echo "" ;;
    fp16) echo "--fp16" ;;
    int8) echo "--int8 --fp16" ;;
    *) return 1 ;;
  esac
}
# build_plan ONNX PLAN INPUT DIMS MIN OPT MAX PRECISION
build_plan() { "${TRTEXEC}" "--onnx=${1}" "--saveEngine=${2}" "--minShapes=${3}:${5}x${4}" "--optShapes=${3}:${6}x${4}" "--maxShapes=${3}:${7}x${4}" "--memPoolSize=workspace:4096M" $(precision_flags "$8"); }
# verify_plan PLAN INPUT DIMS MAX: load the plan and run it once at max batch.
verify_plan() { "${TRTEXEC}" "--loadEngine=${1}" "--shapes=${2}:${4}x${3}" "--warmUp=0" "--duration=0" "--iterations=1"; }
# <<< end of rendered block

case "$POLICY" in fail|fallback) ;; *) log "PLAN_FAILURE_POLICY='$POLICY' is not fail or fallback; set one of them."; exit 2;; esac
case " $PLAN_PRECISIONS " in *" $PRECISION "*) ;; *) log "PLAN_PRECISION='$PRECISION' is not one of: $PLAN_PRECISIONS."; exit 2;; esac
[ -z "${PLAN_SHAPES:-}" ] || log "PLAN_SHAPES is ignored: the profile comes from each model's config.pbtxt (max_batch_size, preferred_batch_size)"

SUMMARY=""; ENTRIES=""; LOCK=""; HEARTBEAT_PID=""; TMP=""
record() {  # model backend detail
  d=$(echo "$3" | tr -d '"\\' | tr '\n' ' ')
  ENTRIES="$ENTRIES${ENTRIES:+, }\"$1\": {\"backend\": \"$2\", \"detail\": \"$d\"}"
  SUMMARY="$SUMMARY${SUMMARY:+; }$1=$2 ($d)"
}
finish() {
  printf '{"policy": "%s", "precision": "%s", "models": {%s}}\n' "$POLICY" "$PRECISION" "$ENTRIES" > "$STATUS"
  printf 'plans: %s\n' "${SUMMARY:-none}" > "$TERMINATION_LOG" 2>/dev/null || true
}
release_lock() {
  # No wait: sh defers the TERM until the heartbeat's sleep returns; the loop then ends on its own.
  [ -n "$HEARTBEAT_PID" ] && { kill "$HEARTBEAT_PID" 2>/dev/null || true; }
  HEARTBEAT_PID=""
  # Only our own lock: a lock broken as stale and re-taken by another pod is theirs.
  [ -n "$LOCK" ] && [ "$(cat "$LOCK/owner" 2>/dev/null)" = "$OWNER" ] && rm -rf "$LOCK"
  LOCK=""
}
cleanup() { release_lock; [ -z "$TMP" ] || rm -f "$TMP.plan" "$TMP.sha256" "$TMP.log"; }
trap cleanup EXIT
trap 'exit 143' TERM INT
failed() {  # model reason: log it, record it, then stop (fail) or keep the ONNX (fallback)
  log "PLAN BUILD FAILED for $1: $2; PLAN_FAILURE_POLICY=$POLICY"
  if [ "$POLICY" = fail ]; then
    record "$1" "failed" "$2"; finish; exit 1
  fi
  record "$1" "onnx-fallback" "$2"
  log "$1: serving the ONNX model (fallback)"
}

cp -R "$SRC"/. "$DST"/
log "copied repository $SRC -> $DST"

# Python decode models (preprocess; guard with DALI) get one instance per CPU core the triton container requests:
# the Deployment passes that request (downward API, rounded up) as PREPROCESS_INSTANCES, so one setting sizes both.
if [ -n "${PREPROCESS_INSTANCES:-}" ]; then
  case "$PREPROCESS_INSTANCES" in ''|*[!0-9]*|0) log "PREPROCESS_INSTANCES='$PREPROCESS_INSTANCES' is not a positive integer; set it from the triton container's requests.cpu."; exit 2;; esac
  for f in "$DST/preprocess/config.pbtxt" "$DST/guard/config.pbtxt"; do
    grep -q '^backend: *"python"' "$f" 2>/dev/null || continue
    sed -i "/^instance_group {/,/^}/ s/^  count: *[0-9]*/  count: $PREPROCESS_INSTANCES/" "$f"
    log "$(basename "$(dirname "$f")"): $PREPROCESS_INSTANCES python instances (the pod's CPU request)"
  done
fi

reason=""
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  reason="no GPU visible (nvidia-smi)"
fi
TRTEXEC=${TRTEXEC:-$(command -v trtexec || true)}
for t in /opt/trtexec/bin/trtexec /usr/src/tensorrt/bin/trtexec; do [ -n "$TRTEXEC" ] || { [ -x "$t" ] && TRTEXEC=$t; } || true; done
[ -n "$reason" ] || [ -n "$TRTEXEC" ] || reason="trtexec not found"
trt=unknown
if [ -z "$reason" ]; then
  # trtexec's banner: "&&&& RUNNING TensorRT.trtexec [TensorRT v100500] ..."
  trt=$("$TRTEXEC" --help 2>&1 | sed -n 's/.*\[TensorRT v\([0-9]*\)\].*/\1/p' | head -n 1)
  [ -n "$trt" ] || trt=unknown
  if [ -n "$WANT_TRT" ] && [ "$trt" != "$WANT_TRT" ]; then
    reason="trtexec is TensorRT v$trt but the server loads v$WANT_TRT plans only"
  fi
fi
if [ -n "$reason" ]; then
  for model in $MODELS; do failed "$model" "$reason"; done
  finish; exit 0
fi
gpu=$(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader | head -n 1 | tr -c 'A-Za-z0-9.\n' '_' | tr -s '_')
cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d '[:space:]')
PLAN_NAME=$(plan_file "$cc")
OWNER="$HOST pid $$"
log "gpu=$gpu cc=$cc tensorrt=$trt precision=$PRECISION policy=$POLICY trtexec=$TRTEXEC"

valid_entry() {  # the cached plan exists and matches its recorded sha256
  [ -s "$entry" ] && [ -s "$entry.sha256" ] && [ "$(sha256sum "$entry" | cut -d' ' -f1)" = "$(cat "$entry.sha256")" ]
}
acquire_lock() {  # 0: lock held; 2: another pod finished the entry meanwhile; 1: gave up waiting
  waited=0
  while ! mkdir "$1" 2>/dev/null; do
    if valid_entry; then return 2; fi
    now=$(date +%s); seen=$(stat -c %Y "$1" 2>/dev/null || echo "$now")
    if [ $((now - seen)) -gt "$LOCK_STALE_S" ]; then
      log "$model: lock held by '$(cat "$1/owner" 2>/dev/null || echo unknown)' has had no heartbeat for $((now - seen)) s: breaking it"
      mv "$1" "$1.stale.$HOST.$$" 2>/dev/null && rm -rf "$1.stale.$HOST.$$"
      continue
    fi
    [ "$waited" -lt "$LOCK_WAIT_S" ] || return 1
    [ "$waited" -gt 0 ] || log "$model: '$(cat "$1/owner" 2>/dev/null || echo another pod)' is building this plan; waiting"
    sleep 1; waited=$((waited + 1))
  done
  LOCK=$1
  echo "$OWNER" > "$LOCK/owner"
  ( while sleep "$HEARTBEAT_S"; do [ -d "$LOCK" ] && touch -c "$LOCK"; done ) </dev/null >/dev/null 2>&1 &
  HEARTBEAT_PID=$!
  return 0
}

for model in $MODELS; do
  dir="$DST/$model"
  onnx="$dir/1/model.onnx"
  if [ ! -f "$onnx" ]; then failed "$model" "no $onnx in the shipped repository"; continue; fi
  # int8 is explicit (Q/DQ) only: without Q/DQ nodes trtexec --int8 uses dummy ranges (op types are plain strings in the protobuf).
  if [ "$PRECISION" = int8 ] && ! grep -q "DequantizeLinear" "$onnx"; then
    failed "$model" "PLAN_PRECISION=int8 needs a Q/DQ ONNX (python -m serve quantize) and $onnx has no DequantizeLinear nodes"; continue
  fi
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
  maxb=$(sed -n 's/^max_batch_size: *\([0-9]*\).*/\1/p' "$dir/config.pbtxt" | head -n 1)
  preferred=$(grep 'preferred_batch_size' "$dir/config.pbtxt" | sed 's/.*preferred_batch_size: *//' | tr -c '0-9' ' ' || true)
  if [ -z "$input" ] || [ -z "$dims" ] || [ -z "$maxb" ] || [ "$maxb" -lt 1 ]; then
    failed "$model" "cannot read input name/dims and max_batch_size >= 1 from config.pbtxt"; continue
  fi
  # shellcheck disable=SC2086
  set -- $(plan_profile "$maxb" $preferred); min=$1; opt=$2; max=$3
  sha=$(sha256sum "$onnx" | cut -c1-16)
  cachedir="$CACHE/$gpu/trt-$trt/$model"
  entry="$cachedir/$sha-$PRECISION-b$min-$opt-$max.plan"
  mkdir -p "$cachedir"
  log "$model: profile batch $min/$opt/$max (config.pbtxt max_batch_size $maxb), input $input:${dims}"
  err=""
  if valid_entry; then
    log "$model: cached plan $entry (sha256 verified)"
  else
    rc=0; acquire_lock "$entry.lock" || rc=$?
    if [ "$rc" = 2 ]; then
      log "$model: another pod built $entry meanwhile (sha256 verified)"
    elif [ "$rc" != 0 ]; then
      err="waited ${LOCK_WAIT_S} s for another pod's build of $entry"
    elif valid_entry; then
      log "$model: another pod built $entry meanwhile (sha256 verified)"
    else
      if [ -e "$entry" ] || [ -e "$entry.sha256" ]; then
        log "$model: cached plan $entry does not match its sha256 (truncated or overwritten): rebuilding"
        rm -f "$entry" "$entry.sha256"
      fi
      TMP="$cachedir/.tmp.$(basename "$entry" .plan).$HOST.$$.$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')"
      log "$model: building $entry"
      if ! build_plan "$onnx" "$TMP.plan" "$input" "$dims" "$min" "$opt" "$max" "$PRECISION" > "$TMP.log" 2>&1 || [ ! -s "$TMP.plan" ]; then
        err="trtexec failed to build the plan"
      elif ! verify_plan "$TMP.plan" "$input" "$dims" "$max" >> "$TMP.log" 2>&1; then
        err="the built plan does not load and run at max batch $max (max_batch_size of config.pbtxt)"
      else
        sha256sum "$TMP.plan" | cut -d' ' -f1 > "$TMP.sha256"
        mv "$TMP.plan" "$entry"            # rename: a reader never sees half a plan,
        mv "$TMP.sha256" "$entry.sha256"   # and a plan without its checksum is not an entry
      fi
      if [ -n "$err" ]; then log "$model: last lines of trtexec:"; tail -n 20 "$TMP.log" || true; fi
      rm -f "$TMP.plan" "$TMP.sha256" "$TMP.log"; TMP=""
    fi
    release_lock
  fi
  if [ -z "$err" ]; then
    cp "$entry" "$dir/1/.$PLAN_NAME.tmp"
    if [ "$(sha256sum "$dir/1/.$PLAN_NAME.tmp" | cut -d' ' -f1)" != "$(cat "$entry.sha256")" ]; then
      rm -f "$dir/1/.$PLAN_NAME.tmp"; err="the copy of $entry does not match its sha256"
    fi
  fi
  if [ -n "$err" ]; then failed "$model" "$err"; continue; fi
  mv "$dir/1/.$PLAN_NAME.tmp" "$dir/1/$PLAN_NAME"
  rm -f "$onnx"      # only now: the plan is verified at max batch and in place
  sed -i -e 's/^platform: *"onnxruntime_onnx"/platform: "tensorrt_plan"/' \
         -e 's/^backend: *"onnxruntime"/platform: "tensorrt_plan"/' \
         -e '/^default_model_filename/d' "$dir/config.pbtxt"
  echo "default_model_filename: \"$PLAN_NAME\"" >> "$dir/config.pbtxt"
  record "$model" "tensorrt_plan" "$PLAN_NAME, TensorRT v$trt, batch $min/$opt/$max, $PRECISION"
  log "$model: serving TensorRT plan $PLAN_NAME"
done
finish
