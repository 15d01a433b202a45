#!/usr/bin/env bash
# GPU self-check (`make gpu-check`; docs/cluster.md section 9): proves the GPU half of the training path on the
# machine at hand in <= 420 s on one GPU and writes DIR/gpu_check.json (rewritten after every step) and
# DIR/gpu_check.log. The steps (scripts/gpu_check/step.py) each run in their own process under their own timeout
# (<= 90 s): facts, the check's own JPEG data, the preflight decision, Trainer vs plain-loop throughput (SE-ResNet50
# and ResNet-50, bf16 and fp16, batch 256 and 128), the real trainer killed and resumed to equal weights, DeepSpeed
# ZeRO-1/2 (bf16 memory vs DDP; fp16 overflow), ONNX export on the GPU, DALI/TensorRT serving where installed, and
# torch.compile. A step needing what the machine lacks (CUDA, DALI, TensorRT) is skipped with the reason.
#
#   --device   for a lent GPU machine with no network: use `python3` from PATH and install .gpu/ (`make gpu-bundle`:
#              the wheels that machine lacks) into a temporary folder with pip --no-index.
#   default    use .venv/bin/python (else python3), as installed by `make venv`.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/gpu_check.sh [--device] [--out DIR] [--python PY] [--tiny] [--budget S] [--only STEP]... [--dry-run] [-h]

  --device      lent GPU machine: python3 from PATH, the wheels of .gpu/ installed offline into a temporary folder
  --out DIR     report folder (default runs/gpu_check): gpu_check.json, gpu_check.log
  --python PY   interpreter (default: python3 with --device, else .venv/bin/python, else python3)
  --tiny        CPU rehearsal: every step at toy sizes, on the CPU when there is no CUDA (proves the code paths)
  --budget S    seconds for the whole check (default 420)
  --only STEP   run this step (and step data) only; repeatable, e.g. to rerun one that failed
  --dry-run     print the interpreter, the bundle install and the steps, run nothing
EOF
}

die() { echo "error: $*" >&2; exit 2; }

OUT=runs/gpu_check
PY=""
DEVICE=0
DRY=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE=1; shift ;;
    --out) [[ $# -ge 2 ]] || die "--out needs a folder."; OUT=$2; shift 2 ;;
    --python) [[ $# -ge 2 ]] || die "--python needs an interpreter path."; PY=$2; shift 2 ;;
    --tiny) EXTRA+=(--tiny); shift ;;
    --only) [[ $# -ge 2 ]] || die "--only needs a step name (scripts/gpu_check/step.py STEPS)."; EXTRA+=(--only "$2"); shift 2 ;;
    --budget) [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || die "--budget needs a whole number of seconds >= 1, got '${2:-}'."
              EXTRA+=(--budget "$2"); shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1'; see scripts/gpu_check.sh --help." ;;
  esac
done

OUT=$(mkdir -p "$OUT" 2>/dev/null && cd "$OUT" && pwd) || die "cannot create the report folder '$OUT'; pass --out with a writable folder."
cd "$(dirname "$0")/.."
if [[ -z "$PY" ]]; then
  if [[ $DEVICE -eq 1 ]]; then PY=python3
  elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
  else PY=python3; fi
fi
command -v "$PY" >/dev/null || die "interpreter '$PY' not found; pass --python."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"

if [[ $DEVICE -eq 1 ]]; then
  [[ $DRY -eq 1 || -f .gpu/requirements.txt ]] || die ".gpu/ holds no bundle; run 'make gpu-bundle' on a machine with PyPI first."
  PYTAG=$("$PY" -c 'import sys; print("py%d%d" % sys.version_info[:2])' 2>/dev/null) || die "interpreter '$PY' does not run."
  if [[ " ${EXTRA[*]} " == *" --tiny "* ]]; then
    # A --tiny rehearsal on a CPU keeps its install (DeepSpeed JIT-compiles its CPU op against these very source
    # paths; a fresh folder would rebuild it every run, minutes on 2 cores), keyed by the bundle's wheels.
    SITE=$PWD/.cache/gpu-site-$PYTAG-$(ls .gpu/*.whl | sha256sum | cut -c1-12)
    [[ -f "$SITE/.complete" ]] && SKIP_INSTALL=1
  else
    SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")
    trap 'rm -rf "$SITE"' EXIT
  fi
  # pip picks, among the bundle's wheels, the ones for this interpreter (cp312 on the GPU machine, cp311 here).
  INSTALL=("$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check
           --find-links .gpu --target "$SITE" -r .gpu/requirements.txt)
  if [[ $DRY -eq 1 ]]; then
    printf '+ [install] %s\n' "$(printf '%q ' "${INSTALL[@]}")"
  elif [[ -z "${SKIP_INSTALL:-}" ]]; then
    PIP_CONFIG_FILE=/dev/null "${INSTALL[@]}" || die "installing .gpu/ with $PY failed (its wheels are for CPython 3.11/3.12); rerun 'make gpu-bundle'."
    touch "$SITE/.complete"
  fi
  export PYTHONPATH="$PYTHONPATH:$SITE"
  # ops DeepSpeed compiles at first use (its CPU shared-memory op in a --tiny rehearsal) are kept per interpreter
  export TORCH_EXTENSIONS_DIR="$PWD/.cache/torch_extensions_${PYTAG}_device"
fi

# A JIT op build killed half-way (a step's timeout) leaves torch's lock file behind; the next build would wait on it
# for ever. Nothing else builds into this folder while the check runs.
[[ $DRY -eq 1 ]] || rm -f "$TORCH_EXTENSIONS_DIR"/*/lock
RUN=("$PY" -m scripts.gpu_check --out "$OUT" "${EXTRA[@]}")
if [[ $DRY -eq 1 ]]; then
  printf '+ [run] %s\n' "$(printf '%q ' "${RUN[@]}")"
  "$PY" -c "from scripts.gpu_check.step import STEPS; print('\n'.join('+ [step] ' + s for s in STEPS))"
  exit 0
fi
exec "${RUN[@]}"
