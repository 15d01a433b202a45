#!/usr/bin/env bash
# GPU self-check (`make gpu-check`): proves the GPU half of the training path on the machine at hand, in under
# 5 minutes on one GPU, and writes one JSON report (default runs/gpu_check/gpu_check.json):
#   1. preflight: the arch/precision decision (`python -m launch preflight --json`, the engine's own rule book)
#   2. short training runs, channels_last on: torchvision and DALI backends, fp16 + GradScaler, and bf16 where the
#      GPU has it natively (compute capability >= 8.0)
#   3. resume: the fp16 torchvision run continued to twice its steps from its own checkpoint
#   4. DeepSpeed ZeRO-2 with SGD (under torchrun, one process)
#   5. ONNX export of the trained checkpoint on the GPU, compared with the PyTorch model on the GPU
#   6. training img/s of SE-ResNet50 at batch 128 (224 px, AMP, channels_last, synthetic data: the GPU, not the
#      input pipeline) next to NVIDIA DeepLearningExamples' per-GPU ResNet-50 figure for the same GPU
#   7. the DALI serving preprocess (`serve repository --preprocess dali`): autoserialized as Triton's DALI backend
#      does it, run with nvJPEG, its pixels held to the python preprocess's (scripts/gpu_dali_check.py)
# Every step is timed and recorded (ok / failed, seconds, log file); the script exits 1 if any step failed.
# `--dry-run` prints the steps' commands without running them (what the CPU tests check).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/gpu_check.sh [--out DIR] [--data DIR] [--steps N] [--python PY] [--dry-run] [-h]

  --out DIR     report folder (default runs/gpu_check): gpu_check.json, preflight.json, one log per step
  --data DIR    ImageFolder with train/ val/ (default data/animals, prepared by scripts.prepare_animals if absent)
  --steps N     optimizer steps per training run (default 30; the resume run goes to 2N)
  --python PY   interpreter (default .venv/bin/python, else python3)
  --dry-run     print each step's command and exit (no GPU needed)
EOF
}

die() { echo "error: $*" >&2; exit 2; }

OUT=runs/gpu_check
DATA=data/animals
STEPS=30
PY=""
DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) [[ $# -ge 2 ]] || die "--out needs a folder."; OUT=$2; shift 2 ;;
    --data) [[ $# -ge 2 ]] || die "--data needs an ImageFolder path."; DATA=$2; shift 2 ;;
    --steps) [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || die "--steps needs a whole number >= 1, got '${2:-}'."; STEPS=$2; shift 2 ;;
    --python) [[ $# -ge 2 ]] || die "--python needs an interpreter path."; PY=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1'; see scripts/gpu_check.sh --help." ;;
  esac
done

cd "$(dirname "$0")/.."
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"

# A small real job: the smoke config at 128 px with the ImageNet stem, metrics off, channels_last on.
TRAIN_SETS=(--config configs/smoke.yaml --set "data.root=$DATA" --set data.image_size=128 --set data.eval_resize=146
            --set model.stem=imagenet --set data.batch_size=64 --set data.workers=4 --set metrics.enabled=false
            --set train.channels_last=on --set train.threads=0 --set train.checkpoint_every_steps=10
            --set "train.max_steps=$STEPS" --set train.log_every_steps=5)

STEPS_RUN=()     # name|status|seconds|log
FAILED=0

step() {  # step NAME COMMAND...: run (or print) one step, record it
  local name=$1; shift
  if [[ $DRY -eq 1 ]]; then
    printf '+ [%s] %s\n' "$name" "$(printf '%q ' "$@")"
    return 0
  fi
  local log="$OUT/$name.log" t0 t1 status=ok
  t0=$(date +%s.%N)
  echo "== $name"
  if ! timeout 600 "$@" >"$log" 2>&1; then status=failed; FAILED=1; tail -n 20 "$log" >&2 || true; fi
  t1=$(date +%s.%N)
  STEPS_RUN+=("$name|$status|$(awk "BEGIN{printf \"%.1f\", $t1-$t0}")|$log")
  echo "   $status ($(awk "BEGIN{printf \"%.1f\", $t1-$t0}") s)"
}

train_step() {  # train_step NAME OUTPUT_DIR BACKEND PRECISION [more --set ...]
  local name=$1 out=$2 backend=$3 precision=$4; shift 4
  step "$name" "$PY" -m train "${TRAIN_SETS[@]}" --set "output_dir=$out" --set "data.backend=$backend" \
       --set "train.precision=$precision" "$@"
}

if [[ $DRY -eq 0 ]]; then
  mkdir -p "$OUT"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total \
    --format=csv,noheader >"$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" >"$OUT/nvidia-smi.txt"
  if [[ ! -d "$DATA/train" ]]; then
    [[ "$DATA" == data/animals ]] || die "--data '$DATA' has no train/ folder; point it at an ImageFolder."
    "$PY" -m scripts.prepare_animals >"$OUT/prepare.log" 2>&1 || die "preparing data/animals failed; see $OUT/prepare.log."
  fi
fi

# 1. preflight (exit 1 = problems: recorded, the rest still runs so the report shows what works)
if [[ $DRY -eq 1 ]]; then
  step preflight "$PY" -m launch preflight --config configs/smoke.yaml --set "data.root=$DATA" --json
else
  step preflight bash -c "$(printf '%q ' "$PY" -m launch preflight --config configs/smoke.yaml --set "data.root=$DATA" --json) > $(printf '%q' "$OUT/preflight.json")"
fi
NATIVE_BF16=0
if [[ $DRY -eq 0 ]]; then
  NATIVE_BF16=$("$PY" -c "import torch; print(int(torch.cuda.is_available() and torch.cuda.get_device_capability(0) >= (8, 0)))" 2>/dev/null || echo 0)
fi

# 2. training runs (channels_last on), 3. resume
train_step train_torchvision_fp16 "$OUT/tv_fp16" torchvision fp16
train_step train_dali_fp16 "$OUT/dali_fp16" dali fp16
if [[ $NATIVE_BF16 -eq 1 || $DRY -eq 1 ]]; then
  train_step train_torchvision_bf16 "$OUT/tv_bf16" torchvision bf16
  train_step train_dali_bf16 "$OUT/dali_bf16" dali bf16
fi
train_step resume "$OUT/tv_fp16" torchvision fp16 --set "train.max_steps=$((2 * STEPS))"

# 4. DeepSpeed ZeRO-2 with SGD under torchrun (one process)
step deepspeed_zero2_sgd "$PY" -m launch local --nproc 1 --engine deepspeed -- "${TRAIN_SETS[@]}" \
  --set "output_dir=$OUT/ds_zero2" --set data.backend=torchvision --set train.precision=auto \
  --set deepspeed.zero_stage=2 --set optim.name=sgd --set optim.lr=0.05

# 5. ONNX export on the GPU, 6. img/s at batch 128 (one Python step each; code below)
step onnx_export_gpu "$PY" - "$OUT/tv_fp16/checkpoints/last.pt" "$OUT/onnx_gpu" <<'PYEOF'
import json, sys, time
import numpy as np, torch
from serve.export import WithSoftmax, ort_session, INPUT_NAME, OUTPUT_NAME
from train.checkpoint import load_for_inference
model, cfg, classes = load_for_inference(sys.argv[1])
model = WithSoftmax(model).eval().cuda()
x = torch.randn(8, 3, cfg.data.image_size, cfg.data.image_size, device="cuda")
out = __import__("pathlib").Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)
t0 = time.perf_counter()
with torch.inference_mode():
    torch.onnx.export(model, (x,), str(out / "model.onnx"), dynamo=False, opset_version=17, input_names=[INPUT_NAME],
                      output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    ref = model(x).float().cpu().numpy()
got = ort_session(out / "model.onnx").run([OUTPUT_NAME], {INPUT_NAME: x.cpu().numpy()})[0]
diff = float(np.abs(got - ref).max())
res = {"export_seconds": round(time.perf_counter() - t0, 2), "max_abs_diff_vs_torch_gpu": diff,
       "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean())}
(out / "onnx_gpu.json").write_text(json.dumps(res)); print(res)
assert diff < 1e-3, f"ONNX (exported on GPU) differs from PyTorch on GPU by {diff}"
PYEOF

# 7. the DALI serving route: its dali.py autoserialized as Triton's DALI backend does, run with nvJPEG on the GPU,
#    pixels compared with the python preprocess (scripts/gpu_dali_check.py)
step dali_serving "$PY" -m scripts.gpu_dali_check "$OUT/tv_fp16/checkpoints/last.pt" "$OUT/dali_serving"

step throughput_b128 "$PY" - "$OUT/throughput.json" <<'PYEOF'
import json, sys, time
import torch
from train.config import ModelConfig
from train.models import create_model
# NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md (commit 729963dd), training
# throughput of ResNet-50 on ONE GPU, mixed precision (batch 256): DGX A100 80GB 2470 img/s, DGX-1 V100 16GB 1200 img/s.
DLE_RN50 = {"A100": 2470, "V100": 1200}
name = torch.cuda.get_device_name(0)
cap = torch.cuda.get_device_capability(0)
dtype = torch.bfloat16 if cap >= (8, 0) else torch.float16
model = create_model(ModelConfig(), 1000, load_pretrained=False).cuda().to(memory_format=torch.channels_last)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.875)
scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
x = torch.randn(128, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
y = torch.randint(0, 1000, (128,), device="cuda")
def step():
    with torch.autocast("cuda", dtype=dtype):
        loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)
    opt.zero_grad(set_to_none=True); scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
for _ in range(15): step()
torch.cuda.synchronize(); t0 = time.perf_counter(); n = 50
for _ in range(n): step()
torch.cuda.synchronize(); ips = n * 128 / (time.perf_counter() - t0)
ref = next((v for k, v in DLE_RN50.items() if k in name), None)
res = {"gpu": name, "compute_capability": f"{cap[0]}.{cap[1]}", "dtype": str(dtype).split(".")[-1], "batch": 128,
       "model": "se_resnet50", "images_per_second": round(ips, 1), "dle_rn50_images_per_second": ref,
       "ratio_vs_dle_rn50": round(ips / ref, 3) if ref else None,
       "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
open(sys.argv[1], "w").write(json.dumps(res)); print(res)
PYEOF

[[ $DRY -eq 1 ]] && exit 0

# The report: every step, the preflight decision, the export and throughput figures, and the resume evidence.
"$PY" - "$OUT" "${STEPS_RUN[@]}" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(p):
    try:
        return json.loads((out / p).read_text())
    except (OSError, ValueError):
        return None
steps = []
for item in sys.argv[2:]:
    name, status, secs, log = item.split("|", 3)
    steps.append({"name": name, "status": status, "seconds": float(secs), "log": log})
resume_log = out / "resume.log"
report = {"gpu": (out / "nvidia-smi.txt").read_text().strip(), "steps": steps, "preflight": load("preflight.json"),
          "resumed": resume_log.exists() and "resuming from" in resume_log.read_text(),
          "reports": {d: load(f"{d}/report.json") is not None for d in ("tv_fp16", "dali_fp16", "tv_bf16", "dali_bf16", "ds_zero2")},
          "onnx_gpu": load("onnx_gpu/onnx_gpu.json"), "throughput": load("throughput.json"),
          "dali_serving": load("dali_serving/dali_serving.json")}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2))
print(f"wrote {out / 'gpu_check.json'}: " + ", ".join(f"{s['name']} {s['status']}" for s in steps))
PYEOF
exit $FAILED
