#!/bin/sh
# Init container: copy the shipped Triton repository to a writable volume and, for each model named in
# PLAN_MODELS, build a TensorRT plan from its ONNX with trtexec ON THIS GPU, then swap it in. The recipe
# (profile, trtexec argv, plan file name) is the rendered block below, generated from serve/tensorrt.py.
#
#   - Profile from the model's config.pbtxt (written from the training config's `serve:` section): min 1,
#     opt = the largest preferred_batch_size, max = max_batch_size. Triton refuses a plan whose max batch is
#     below max_batch_size, so the built plan is first loaded and run at max batch; only then is it cached
#     and does it replace the ONNX (kept until that moment).
#   - Precision: PLAN_PRECISION=auto (default) takes the repository's: a Q/DQ (int8) repository builds int8 from
#     its Q/DQ model.onnx, an fp32 one builds fp16 from model.fp16.onnx (TensorRT 11 is strongly typed: no
#     --fp16/--int8, the ONNX's types decide; plan_onnx below). A Q/DQ ONNX is never built as fp16/fp32.
#   - A GPU below PLAN_MIN_CC (V100: 7.0 < 7.5) is refused: the pinned Triton does not serve it.
#   - Plans may be cached on a shared volume per GPU model, TensorRT version, ONNX checksum, precision and
#     profile. Concurrent pods: one builds under a lock (mkdir, with an owner file, a heartbeat and stale-lock
#     recovery), the others wait; temp files carry hostname+pid+random; an entry is the plan plus its sha256,
#     verified on every reuse (a bad entry is rebuilt). The cache is optional: a plan is always built and
#     verified in the pod's own volume (PLAN_WORK) and then published; any cache error (no volume, read-only,
#     root-squash NFS, full disk) is logged, counted in plan-status.json ("cache_errors") and the termination
#     message, and the plan built in the pod is served.
#   - A failed build is never silent: a log line, plan-status.json in the served repository, and the init
#     container's termination message (kubectl describe pod). PLAN_FAILURE_POLICY=fail stops the pod (it
#     cannot serve a slow ONNX fallback unnoticed); fallback serves the ONNX model.
#
#   SRC_REPOSITORY        shipped repository (read-only, in the image)        default /models
#   DST_REPOSITORY        repository Triton serves (emptyDir)                 default /repository
#   PLAN_CACHE            cache volume                                        default /plan-cache
#   PLAN_MODELS           space/comma separated model names                   default se_resnet50
#   PLAN_PRECISION        auto | fp32 | fp16 | int8 (int8: Q/DQ ONNX)        default auto (the repository's)
#   PLAN_FAILURE_POLICY   fail | fallback                                     default fail
#   PLAN_TENSORRT_VERSION trtexec's version tag the server's TensorRT needs, e.g. 110300 (empty: not checked)
#   PLAN_LOCK_WAIT_S      how long to wait for another pod's build            default 1800
#   PLAN_LOCK_STALE_S     a lock without a heartbeat for this long is broken  default 120
#   PLAN_TERMINATION_LOG  where the summary goes                              default /dev/termination-log
#   PLAN_WORK             where plans are built and verified (pod-local)      default $TMPDIR/plan-build.<pid>
set -eu
SRC=${SRC_REPOSITORY:-/models}
DST=${DST_REPOSITORY:-/repository}
CACHE=${PLAN_CACHE:-/plan-cache}
MODELS=$(echo "${PLAN_MODELS:-se_resnet50}" | tr ',' ' ')
PRECISION=${PLAN_PRECISION:-auto}
POLICY=${PLAN_FAILURE_POLICY:-fail}
WANT_TRT=${PLAN_TENSORRT_VERSION:-}
LOCK_WAIT_S=${PLAN_LOCK_WAIT_S:-1800}
LOCK_STALE_S=${PLAN_LOCK_STALE_S:-120}
HEARTBEAT_S=$(( LOCK_STALE_S / 4 > 0 ? LOCK_STALE_S / 4 : 1 ))
TERMINATION_LOG=${PLAN_TERMINATION_LOG:-/dev/termination-log}
HOST=$(hostname 2>/dev/null || cat /etc/hostname 2>/dev/null || echo pod)
STATUS="$DST/plan-status.json"
WORK=${PLAN_WORK:-${TMPDIR:-/tmp}/plan-build.$$}
CACHE_ERRORS=0

log() { echo "[build-plans] $*"; }

# >>> rendered by `python -m serve.tensorrt --write-k8s` from serve/tensorrt.py: do not edit by hand
PLAN_PRECISIONS="fp32 fp16 int8"
CLASSIFIER_MODEL="se_resnet50"
PLAN_MIN_CC="7.5"      # train/compat.yaml serving: the pinned Triton serves no older GPU
# plan_onnx PRECISION: the file of the model's version folder a plan of that precision is built from
# (serve.tensorrt.PLAN_ONNX: strongly typed TensorRT builds the ONNX's own types).
plan_onnx() {
  case "$1" in
    fp32) echo "model.onnx" ;;
    fp16) echo "model.fp16.onnx" ;;
    int8) echo "model.onnx" ;;
    *) return 1 ;;
  esac
}
# cc_supported CC: true when CC >= PLAN_MIN_CC (serve.tensorrt.check_gpu_supported).
cc_supported() {
  awk -v a="$1" -v b="$PLAN_MIN_CC" 'BEGIN { split(a, x, "."); split(b, y, "."); exit !(x[1] * 100 + x[2] >= y[1] * 100 + y[2]) }'
}
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
    fp16) echo "" ;;
    int8) echo "" ;;
    *) return 1 ;;
  esac
}
# build_plan ONNX PLAN INPUT DIMS MIN OPT MAX PRECISION
build_plan() { "${TRTEXEC}" "--onnx=${1}" "--saveEngine=${2}" "--minShapes=${3}:${5}x${4}" "--optShapes=${3}:${6}x${4}" "--maxShapes=${3}:${7}x${4}" "--memPoolSize=workspace:4096M" $(precision_flags "$8"); }
# verify_plan PLAN INPUT DIMS MAX: load the plan and run it once at max batch.
verify_plan() { "${TRTEXEC}" "--loadEngine=${1}" "--shapes=${2}:${4}x${3}" "--warmUp=0" "--duration=0" "--iterations=1"; }
# <<< end of rendered block

case "$POLICY" in fail|fallback) ;; *) log "PLAN_FAILURE_POLICY='$POLICY' is not fail or fallback; set one of them."; exit 2;; esac
case " auto $PLAN_PRECISIONS " in *" $PRECISION "*) ;; *) log "PLAN_PRECISION='$PRECISION' is not one of: auto $PLAN_PRECISIONS."; exit 2;; esac
[ -z "${PLAN_SHAPES:-}" ] || log "PLAN_SHAPES is ignored: the profile comes from each model's config.pbtxt (max_batch_size, preferred_batch_size)"

SUMMARY=""; ENTRIES=""; LOCK=""; HEARTBEAT_PID=""; TMP=""
record() {  # model backend detail
  d=$(echo "$3" | tr -d '"\\' | tr '\n' ' ')
  ENTRIES="$ENTRIES${ENTRIES:+, }\"$1\": {\"backend\": \"$2\", \"detail\": \"$d\"}"
  SUMMARY="$SUMMARY${SUMMARY:+; }$1=$2 ($d)"
}
finish() {
  printf '{"policy": "%s", "precision": "%s", "cache_errors": %s, "models": {%s}}\n' "$POLICY" "$PRECISION" \
    "$CACHE_ERRORS" "$ENTRIES" > "$STATUS"
  printf 'plans: %s; plan cache errors: %s\n' "${SUMMARY:-none}" "$CACHE_ERRORS" > "$TERMINATION_LOG" 2>/dev/null || true
}
cache_error() {  # what went wrong: logged and counted; the plan is built (or was) in the pod's own volume
  CACHE_ERRORS=$((CACHE_ERRORS + 1))
  log "PLAN CACHE ERROR ($CACHE_ERRORS): $*; building and serving from the pod's own volume"
}
release_lock() {
  # No wait: sh defers the TERM until the heartbeat's sleep returns; the loop then ends on its own.
  [ -n "$HEARTBEAT_PID" ] && { kill "$HEARTBEAT_PID" 2>/dev/null || true; }
  HEARTBEAT_PID=""
  # Only our own lock: a lock broken as stale and re-taken by another pod is theirs.
  [ -n "$LOCK" ] && [ "$(cat "$LOCK/owner" 2>/dev/null)" = "$OWNER" ] && rm -rf "$LOCK"
  LOCK=""
}
cleanup() { release_lock; [ -z "$TMP" ] || rm -f "$TMP.plan" "$TMP.sha256" "$TMP.log"; rm -rf "$WORK"; }
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

# /dev/shm (memory-backed; the pod is evicted past its sizeLimit, PYTHON_SHM_BYTES): every python instance may hold a
# full batch of its largest requests and their outputs at once, plus its stub's 1 MiB region (serve/model_config.py
# python_shm_bytes). Refuse to start a pod whose python models could outgrow it (e.g. a larger CPU request).
if [ -n "${PYTHON_SHM_BYTES:-}" ]; then
  need=0
  for f in "$DST"/*/config.pbtxt; do
    grep -q '^backend: *"python"' "$f" 2>/dev/null || continue
    need=$(awk -v need="$need" '
      /^max_batch_size:/ { batch = $2 }
      /^instance_group/ { ig = 1 } ig && /count:/ { count = $2; ig = 0 }
      /^output/ { out = 1; prod = 4 } out && /dims:/ { v = $0; sub(/.*dims: */, "", v); gsub(/[][ ]/, "", v); n = split(v, d, ",");
                                                       for (i = 1; i <= n; i++) prod *= (d[i] < 0 ? -1 : d[i]) }
      out && /^}/ { out = 0 }
      /key: *"MAX_REQUEST_BYTES"/ { req = 1 } req && /string_value/ { v = $0; gsub(/[^0-9]/, "", v); request = v; req = 0 }
      END { if (prod < 0) prod = request;   # a bytes output ([-1]) is the request passed on (the guard)
            if (request == "") request = prod;  # no request limit (postprocess): input as large as the output
            printf "%.0f", need + (count ? count : 1) * ((batch ? batch : 1) * (request + prod) + 1048576) }' "$f")
  done
  if [ "$need" -gt "$PYTHON_SHM_BYTES" ]; then
    log "the python models may hold $need bytes in /dev/shm but the volume holds $PYTHON_SHM_BYTES; raise the dshm sizeLimit and PYTHON_SHM_BYTES together, or lower the CPU request or serve.max_request_bytes."
    printf 'python models need %s bytes of /dev/shm, the volume holds %s\n' "$need" "$PYTHON_SHM_BYTES" > "$TERMINATION_LOG" 2>/dev/null || true
    exit 2
  fi
  log "python models: at most $need of $PYTHON_SHM_BYTES bytes of /dev/shm"
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
if ! cc_supported "$cc"; then
  for model in $MODELS; do
    failed "$model" "compute capability $cc is below $PLAN_MIN_CC, the minimum of the pinned Triton (train/compat.yaml serving): no plan is built for this GPU; serve on Turing (7.5) or newer"
  done
  finish; exit 0
fi
mkdir -p "$WORK"

valid_entry() {  # the cached plan exists and matches its recorded sha256
  [ -s "$entry" ] && [ -s "$entry.sha256" ] && [ "$(sha256sum "$entry" | cut -d' ' -f1)" = "$(cat "$entry.sha256")" ]
}
acquire_lock() {  # 0: lock held; 2: another pod finished the entry meanwhile; 1: gave up waiting; 3: cache error
  waited=0
  while ! mkdir "$1" 2>/dev/null; do
    if valid_entry; then return 2; fi
    [ -d "$1" ] || { cache_error "cannot create the lock $1"; return 3; }
    now=$(date +%s); seen=$(stat -c %Y "$1" 2>/dev/null || echo "$now")
    if [ $((now - seen)) -gt "$LOCK_STALE_S" ]; then
      log "$model: lock held by '$(cat "$1/owner" 2>/dev/null || echo unknown)' has had no heartbeat for $((now - seen)) s: breaking it"
      { mv "$1" "$1.stale.$HOST.$$" 2>/dev/null && rm -rf "$1.stale.$HOST.$$"; } || true
      continue
    fi
    [ "$waited" -lt "$LOCK_WAIT_S" ] || return 1
    [ "$waited" -gt 0 ] || log "$model: '$(cat "$1/owner" 2>/dev/null || echo another pod)' is building this plan; waiting"
    sleep 1; waited=$((waited + 1))
  done
  LOCK=$1
  if ! echo "$OWNER" 2>/dev/null > "$LOCK/owner"; then rmdir "$LOCK" 2>/dev/null || true; LOCK=""; cache_error "cannot write $1/owner"; return 3; fi
  ( while sleep "$HEARTBEAT_S"; do [ -d "$LOCK" ] && touch -c "$LOCK"; done ) </dev/null >/dev/null 2>&1 &
  HEARTBEAT_PID=$!
  return 0
}

publish() {  # PLAN SHA: copy a verified plan into the cache entry (temp name, sha256, then rename); 1 on any failure
  ptmp="$cachedir/.tmp.$(basename "$entry" .plan).$HOST.$$.$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')"
  if cp "$1" "$ptmp.plan" 2>/dev/null && [ "$(sha256sum "$ptmp.plan" 2>/dev/null | cut -d' ' -f1)" = "$2" ] \
     && echo "$2" 2>/dev/null > "$ptmp.sha256" && mv "$ptmp.plan" "$entry" 2>/dev/null \
     && mv "$ptmp.sha256" "$entry.sha256" 2>/dev/null; then
    return 0   # rename: a reader never sees half a plan, and a plan without its checksum is not an entry
  fi
  rm -f "$ptmp.plan" "$ptmp.sha256" 2>/dev/null || true
  return 1
}
build_here() {  # build and verify in the pod's volume: sets PLAN_SRC/PLAN_SHA or err
  TMP="$WORK/$model.$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')"
  log "$model: building a $prec plan from $(basename "$onnx")"
  if ! build_plan "$onnx" "$TMP.plan" "$input" "$dims" "$min" "$opt" "$max" "$prec" > "$TMP.log" 2>&1 || [ ! -s "$TMP.plan" ]; then
    err="trtexec failed to build the plan"
  elif ! verify_plan "$TMP.plan" "$input" "$dims" "$max" >> "$TMP.log" 2>&1; then
    err="the built plan does not load and run at max batch $max (max_batch_size of config.pbtxt)"
  else
    PLAN_SRC="$TMP.plan"; PLAN_SHA=$(sha256sum "$TMP.plan" | cut -d' ' -f1)
    if [ -n "$entry" ]; then publish "$TMP.plan" "$PLAN_SHA" || cache_error "could not write $entry"; fi
  fi
  if [ -n "$err" ]; then log "$model: last lines of trtexec:"; tail -n 20 "$TMP.log" || true; fi
}

for model in $MODELS; do
  dir="$DST/$model"
  if [ ! -f "$dir/config.pbtxt" ]; then failed "$model" "no $dir/config.pbtxt in the shipped repository"; continue; fi
  prec=$PRECISION
  if [ "$prec" = auto ]; then   # the repository's precision (the PRECISION parameter of serve repository)
    repo_prec=$(sed -n '/key: *"PRECISION"/,/string_value/ s/.*string_value: *"\([a-z0-9]*\)".*/\1/p' "$dir/config.pbtxt" | head -n 1)
    prec=fp16; [ "$repo_prec" = int8 ] && prec=int8
  fi
  onnx="$dir/1/$(plan_onnx "$prec")"
  if [ ! -f "$onnx" ]; then
    failed "$model" "no $onnx in the shipped repository for a $prec plan (serve repository writes it for the GPU targets)"; continue
  fi
  # Q/DQ decides int8 (op types are plain strings in the protobuf): an int8 plan needs it, no other precision may have it.
  if [ "$prec" = int8 ] && ! grep -q "DequantizeLinear" "$onnx"; then
    failed "$model" "PLAN_PRECISION=int8 needs a Q/DQ ONNX (python -m serve quantize) and $onnx has no DequantizeLinear nodes"; continue
  fi
  if [ "$prec" != int8 ] && grep -q "DequantizeLinear" "$dir/1/model.onnx" 2>/dev/null; then
    failed "$model" "$dir/1/model.onnx carries Q/DQ nodes: it builds as int8 only (PLAN_PRECISION=auto or int8), not $prec"; continue
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
  entry="$cachedir/$sha-$prec-b$min-$opt-$max.plan"
  if ! mkdir -p "$cachedir" 2>/dev/null || [ ! -w "$cachedir" ]; then
    cache_error "cannot write $cachedir"; entry=""
  fi
  log "$model: $prec, profile batch $min/$opt/$max (config.pbtxt max_batch_size $maxb), input $input:${dims}"
  err=""; PLAN_SRC=""; PLAN_SHA=""
  if [ -n "$entry" ] && valid_entry; then
    log "$model: cached plan $entry (sha256 verified)"; PLAN_SRC=$entry; PLAN_SHA=$(cat "$entry.sha256")
  else
    rc=0; [ -z "$entry" ] || acquire_lock "$entry.lock" || rc=$?
    if [ -n "$entry" ] && { [ "$rc" = 2 ] || { [ "$rc" = 0 ] && valid_entry; }; }; then
      log "$model: another pod built $entry meanwhile (sha256 verified)"; PLAN_SRC=$entry; PLAN_SHA=$(cat "$entry.sha256")
    elif [ "$rc" = 1 ]; then
      err="waited ${LOCK_WAIT_S} s for another pod's build of $entry"
    else
      [ "$rc" = 3 ] && entry=""
      if [ -n "$entry" ] && { [ -e "$entry" ] || [ -e "$entry.sha256" ]; }; then
        log "$model: cached plan $entry does not match its sha256 (truncated or overwritten): rebuilding"
        rm -f "$entry" "$entry.sha256" 2>/dev/null || cache_error "cannot remove the bad entry $entry"
      fi
      build_here
    fi
    release_lock
  fi
  if [ -z "$err" ]; then
    if ! cp "$PLAN_SRC" "$dir/1/.$PLAN_NAME.tmp" 2>/dev/null \
       || [ "$(sha256sum "$dir/1/.$PLAN_NAME.tmp" | cut -d' ' -f1)" != "$PLAN_SHA" ]; then
      rm -f "$dir/1/.$PLAN_NAME.tmp"
      if [ "$PLAN_SRC" = "${entry:-}" ]; then   # a cache read failed: build here instead
        cache_error "cannot read $entry back intact"; entry=""; build_here
        [ -n "$err" ] || cp "$PLAN_SRC" "$dir/1/.$PLAN_NAME.tmp"
      else
        err="the copy of the built plan does not match its sha256"
      fi
    fi
  fi
  rm -f "${TMP:-/nonexistent}.plan" "${TMP:-/nonexistent}.log"; TMP=""
  if [ -n "$err" ]; then failed "$model" "$err"; continue; fi
  mv "$dir/1/.$PLAN_NAME.tmp" "$dir/1/$PLAN_NAME"
  rm -f "$dir/1/model.onnx" "$dir/1/model.fp16.onnx"   # only now: the plan is verified at max batch and in place
  sed -i -e 's/^platform: *"onnxruntime_onnx"/platform: "tensorrt_plan"/' \
         -e 's/^backend: *"onnxruntime"/platform: "tensorrt_plan"/' \
         -e '/^default_model_filename/d' "$dir/config.pbtxt"
  echo "default_model_filename: \"$PLAN_NAME\"" >> "$dir/config.pbtxt"
  record "$model" "tensorrt_plan" "$PLAN_NAME, TensorRT v$trt, batch $min/$opt/$max, $prec"
  log "$model: serving TensorRT plan $PLAN_NAME"
done
finish
