"""The one TensorRT plan recipe: optimisation profile from the serve config, the trtexec argv (build and the
max-batch load check), the shell block the Kubernetes init container (k8s/serving/base/build-plans.sh) runs,
and the Python-API builder for a GPU box.

Facts the recipe rests on (versions: train/compat.yaml, `serving:`):
- Triton refuses a plan whose profile max batch is below the model's ``max_batch_size`` ("engine only supports
  max-batch N"), so the profile is min 1, opt = the largest preferred batch size, max = ``serve.max_batch_size``
  (``plan_profile``: `serve trt`, the init container and `serve repository --plan` all use it), and the built plan
  is loaded at max batch (``trtexec --loadEngine --shapes``) before it replaces the ONNX.
- A plan only loads in the TensorRT version that built it ("version tag does not match"): plans are built by the
  trtexec of the Triton image's TensorRT (pinned in the table), never by whatever ``pip install tensorrt`` gets.
- TensorRT 11 (the table's ``strongly_typed``) builds strongly typed networks only: no --fp16/--int8 builder
  flags, the ONNX's tensor types decide. An fp16 plan is built from the fp16-typed copy of the ONNX
  (model.fp16.onnx, fp32 input and output kept), an int8 plan from the Q/DQ ONNX; implicit int8 calibration
  (IInt8EntropyCalibrator2, trtexec --calib) is gone.
- The pinned Triton needs compute capability ``min_compute_capability`` or later: a plan for an older GPU (V100)
  is refused in one sentence (``check_gpu_supported``).

``python -m serve.tensorrt --write-k8s`` rewrites the rendered block of build-plans.sh; ``--check`` fails when the
committed script differs (tests/test_build_plans.py runs it).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from serve.contract import CLASSIFIER, EXPORT_FP16_ONNX, EXPORT_ONNX, EXPORT_SPEC, INPUT_NAME, plan_filename
from serve.errors import ServeError
from serve.trt_onnx import (onnx_has_qdq, onnx_image_size, onnx_is_fp16,  # noqa: F401 (re-exported)
                             parse_trtexec_perf, write_fp16_onnx)
from train.compat import load_table

PRECISIONS = ("fp32", "fp16", "int8")
WORKSPACE_MIB = 4096
BUILD_PLANS_SCRIPT = Path(__file__).resolve().parents[1] / "k8s" / "serving" / "base" / "build-plans.sh"
BEGIN_MARK = "# >>> rendered by `python -m serve.tensorrt --write-k8s` from serve/tensorrt.py: do not edit by hand"
END_MARK = "# <<< end of rendered block"
SERVING = load_table()["serving"]
ROW = SERVING["rows"][SERVING["current"]]
STRONGLY_TYPED = bool(ROW["strongly_typed"])
MIN_CC = ROW["min_compute_capability"]
# The file of the classifier's version folder a plan of each precision is built from (the init container's choice).
PLAN_ONNX = {"fp32": EXPORT_ONNX, "fp16": EXPORT_FP16_ONNX if STRONGLY_TYPED else EXPORT_ONNX, "int8": EXPORT_ONNX}


def _cc(cc: str) -> tuple[int, int]:
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


def check_gpu_supported(cc: str) -> None:
    """Refuse a GPU the pinned Triton does not serve (V100: 7.0 < 7.5), in one sentence."""
    if _cc(cc) < _cc(MIN_CC):
        name = {"7.0": " (V100)", "7.2": " (Xavier)", "6.0": " (P100)", "6.1": " (P4/P40)"}.get(str(cc), "")
        raise ServeError(f"compute capability {cc}{name} is below {MIN_CC}, the minimum of Triton {SERVING['current']} "
                         f"(train/compat.yaml serving), and no Triton release without the known critical advisories "
                         f"serves it: build and serve plans on Turing (7.5) or newer.")


def plan_profile(max_batch_size: int, preferred_batch_sizes: Sequence[int] = ()) -> tuple[int, int, int]:
    """(min, opt, max) batch of the optimisation profile: 1, the largest preferred size <= max, the model's max."""
    if int(max_batch_size) < 1:
        raise ServeError(f"serve.max_batch_size is {max_batch_size}; a TensorRT plan needs a max batch of at least 1.")
    fitting = [int(b) for b in preferred_batch_sizes if 1 <= int(b) <= int(max_batch_size)]
    return 1, (max(fitting) if fitting else int(max_batch_size)), int(max_batch_size)


def plan_source(onnx_path: str | Path, precision: str, out_dir: str | Path) -> Path:
    """The ONNX a ``precision`` plan is built from: the fp16-typed copy in ``out_dir`` for fp16 of an fp32 model on a
    strongly typed TensorRT (written by ``build_plan``), else ``onnx_path`` itself."""
    p = Path(onnx_path)
    if precision == "fp16" and STRONGLY_TYPED and not (p.is_file() and onnx_is_fp16(p)):
        return Path(out_dir) / EXPORT_FP16_ONNX
    return p


def profile_for_onnx(onnx_path: str | Path, max_batch: Optional[int] = None) -> tuple[int, int, int]:
    """The profile for an exported ONNX: serve.max_batch_size and preferred sizes of the serving_spec.json beside it
    (what the repository's config.pbtxt will say), ``max_batch`` overriding the max."""
    spec_path = Path(onnx_path).parent / EXPORT_SPEC
    serve = json.loads(spec_path.read_text())["serve"] if spec_path.is_file() else {}
    if max_batch is None and "max_batch_size" not in serve:
        raise ServeError(f"no {EXPORT_SPEC} beside '{onnx_path}' to read serve.max_batch_size from; pass --max-batch "
                         "(the max_batch_size of the repository that will serve the plan).")
    return plan_profile(max_batch or serve["max_batch_size"], serve.get("preferred_batch_sizes", []))


def precision_flags(precision: str) -> list[str]:
    """trtexec precision flags: none on a strongly typed TensorRT (11: the ONNX's types decide). TensorRT 10:
    --fp16, and for int8 (explicit Q/DQ) --int8 --fp16 (layers outside Q/DQ pairs in fp16); never --calib."""
    if precision not in PRECISIONS:
        raise ServeError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}.")
    if STRONGLY_TYPED:
        return []
    return {"fp32": [], "fp16": ["--fp16"], "int8": ["--int8", "--fp16"]}[precision]


def _shape(input_name: str, batch, dims: str) -> str:
    return f"{input_name}:{batch}x{dims}"


def trtexec_command(onnx_path: str | Path, plan_path: str | Path, precision: str = "fp16", min_batch=1,
                    opt_batch=None, max_batch=32, image_size: Optional[int] = None,
                    calib_cache: Optional[str | Path] = None, workspace_mib: int = WORKSPACE_MIB,
                    input_name: str = INPUT_NAME, dims: Optional[str] = None, trtexec: str = "trtexec") -> list[str]:
    """The trtexec argv that builds the plan (what the init container and scripts/gpu_serving_check.sh run).

    ``opt_batch`` defaults to ``max_batch``; ``dims`` ("3x224x224") defaults to 3xSxS from the ONNX."""
    flags = precision_flags(precision)
    if calib_cache:
        raise ServeError("trtexec --calib (implicit int8 calibration) is deprecated in TensorRT 10 and removed in 11; "
                         "quantize the ONNX with Q/DQ nodes ('python -m serve quantize') and build that with --precision int8.")
    if dims is None:
        s = image_size or onnx_image_size(onnx_path)
        dims = f"3x{s}x{s}"
    if Path(onnx_path).is_file():
        qdq = onnx_has_qdq(onnx_path)
        if precision == "int8" and not qdq:
            raise ServeError(f"'{onnx_path}' has no QuantizeLinear/DequantizeLinear nodes, so an int8 plan would use dummy "
                             "ranges; build int8 from the Q/DQ model of 'python -m serve quantize'.")
        if precision != "int8" and qdq:
            raise ServeError(f"'{onnx_path}' carries Q/DQ nodes: it builds as int8 only; pass --precision int8.")
        if precision == "fp16" and STRONGLY_TYPED and not onnx_is_fp16(onnx_path):
            raise ServeError(f"'{onnx_path}' is an fp32 ONNX and TensorRT {ROW['tensorrt']} builds the types the ONNX "
                             f"has (no --fp16): build fp16 from its fp16-typed copy ('python -m serve trt' writes "
                             f"{EXPORT_FP16_ONNX}; 'python -m serve.tensorrt --fp16-onnx SRC DST').")
    opt = max_batch if opt_batch is None else opt_batch
    return [trtexec, f"--onnx={onnx_path}", f"--saveEngine={plan_path}",
            f"--minShapes={_shape(input_name, min_batch, dims)}", f"--optShapes={_shape(input_name, opt, dims)}",
            f"--maxShapes={_shape(input_name, max_batch, dims)}", f"--memPoolSize=workspace:{workspace_mib}M", *flags]


def verify_command(plan_path: str | Path, max_batch, dims: str, input_name: str = INPUT_NAME,
                   trtexec: str = "trtexec") -> list[str]:
    """Load the plan and run it once at max batch: fails (exit != 0) when the profile does not cover it."""
    return [trtexec, f"--loadEngine={plan_path}", f"--shapes={_shape(input_name, max_batch, dims)}",
            "--warmUp=0", "--duration=0", "--iterations=1"]


def _sh(args: list[str]) -> str:
    """Quote an argv for sh, leaving ${var} references expandable (each word in double quotes)."""
    return " ".join('"' + a.replace('"', '\\"') + '"' for a in args)


def rendered_block() -> str:
    """The shell functions build-plans.sh calls: plan file name, profile, build and verify commands."""
    build = trtexec_command("${1}", "${2}", "fp32", "${5}", "${6}", "${7}", input_name="${3}", dims="${4}",
                            trtexec="${TRTEXEC}")
    verify = verify_command("${1}", "${4}", "${3}", input_name="${2}", trtexec="${TRTEXEC}")
    cases = "\n".join(f"    {p}) echo \"{' '.join(precision_flags(p))}\" ;;" for p in PRECISIONS)
    plan_name = plan_filename("@CC@").replace("@CC@", "$(echo \"$1\" | tr -d '.')")
    return "\n".join([
        BEGIN_MARK,
        f'PLAN_PRECISIONS="{" ".join(PRECISIONS)}"',
        f'CLASSIFIER_MODEL="{CLASSIFIER}"',
        f'PLAN_MIN_CC="{MIN_CC}"      # train/compat.yaml serving: the pinned Triton serves no older GPU',
        "# plan_onnx PRECISION: the file of the model's version folder a plan of that precision is built from",
        "# (serve.tensorrt.PLAN_ONNX: strongly typed TensorRT builds the ONNX's own types).",
        "plan_onnx() {",
        '  case "$1" in',
        "\n".join(f'    {p}) echo "{PLAN_ONNX[p]}" ;;' for p in PRECISIONS),
        "    *) return 1 ;;",
        "  esac",
        "}",
        "# cc_supported CC: true when CC >= PLAN_MIN_CC (serve.tensorrt.check_gpu_supported).",
        "cc_supported() {",
        '  awk -v a="$1" -v b="$PLAN_MIN_CC" \'BEGIN { split(a, x, "."); split(b, y, "."); exit !(x[1] * 100 + x[2] >= y[1] * 100 + y[2]) }\'',
        "}",
        "# plan_file CC: the per-GPU plan file name (serve.contract.plan_filename).",
        f'plan_file() {{ echo "{plan_name}"; }}',
        "# plan_profile MAX PREFERRED...: min opt max (serve.tensorrt.plan_profile).",
        "plan_profile() {",
        '  max=$1; shift; opt=""',
        '  for b in "$@"; do [ "$b" -ge 1 ] && [ "$b" -le "$max" ] && { [ -z "$opt" ] || [ "$b" -gt "$opt" ]; } && opt=$b; done',
        '  echo "1 ${opt:-$max} $max"',
        "}",
        "precision_flags() {",
        '  case "$1" in',
        cases,
        "    *) return 1 ;;",
        "  esac",
        "}",
        "# build_plan ONNX PLAN INPUT DIMS MIN OPT MAX PRECISION",
        f'build_plan() {{ {_sh(build)} $(precision_flags "$8"); }}',
        "# verify_plan PLAN INPUT DIMS MAX: load the plan and run it once at max batch.",
        f"verify_plan() {{ {_sh(verify)}; }}",
        END_MARK,
    ])


def script_with_block(text: str) -> str:
    start, end = text.index(BEGIN_MARK), text.index(END_MARK) + len(END_MARK)
    return text[:start] + rendered_block() + text[end:]


def init_container_script() -> str:
    """The init container's script (k8s/serving/base/build-plans.sh with the rendered block in place)."""
    return script_with_block(BUILD_PLANS_SCRIPT.read_text())


def _require_tensorrt():
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError:
        raise ServeError("TensorRT is not installed here (import tensorrt failed); build plans on a GPU node with the "
                         "tensorrt extra, or run the printed trtexec command in the Triton container.") from None
    import torch

    if not torch.cuda.is_available():
        raise ServeError("TensorRT is installed but no CUDA GPU is visible; build the plan on a GPU node or with the trtexec init container.")
    return trt


def _plan_meta_path(plan: str | Path) -> Path:
    return Path(f"{plan}.json")


def build_plan(onnx_path: str | Path, out_dir: str | Path, precision: str = "fp16", min_batch: Optional[int] = None,
               opt_batch: Optional[int] = None, max_batch: Optional[int] = None, workspace_mib: int = WORKSPACE_MIB,
               calib_cache=None) -> dict:
    """Build ``out_dir/model.sm<CC>.plan`` with the TensorRT Python API (same profile and network types as the
    trtexec recipe), check it runs at max batch, and write ``<plan>.json`` (profile, TensorRT, GPU, precision) that
    `serve repository --plan` checks. The profile defaults to ``profile_for_onnx`` (the export's serving spec); int8
    comes from a Q/DQ ONNX (a ``calib_cache`` is refused by ``trtexec_command``: TensorRT 11 has no calibrators)."""
    onnx_path, out = Path(onnx_path), Path(out_dir)
    rule = profile_for_onnx(onnx_path, max_batch)
    min_batch, opt_batch, max_batch = min_batch or rule[0], opt_batch or rule[1], max_batch or rule[2]
    src, size = plan_source(onnx_path, precision, out), onnx_image_size(onnx_path)
    argv = trtexec_command(src, out / plan_filename("<CC>"), precision, min_batch, opt_batch, max_batch, size,
                           calib_cache=calib_cache, workspace_mib=workspace_mib)
    trt = _require_tensorrt()
    import torch

    major, minor = torch.cuda.get_device_capability()
    cc = f"{major}.{minor}"
    check_gpu_supported(cc)
    if src != onnx_path:
        write_fp16_onnx(onnx_path, src)
    out.mkdir(parents=True, exist_ok=True)
    plan = out / plan_filename(cc)
    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Strongly typed: the ONNX's types decide (TensorRT 11's only mode; the flag is TensorRT 10's way to ask for it).
    typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None) if STRONGLY_TYPED else None
    network = builder.create_network(0 if typed is None else 1 << int(typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(src.read_bytes()):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ServeError(f"TensorRT could not parse '{src}': {errs}.")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (min_batch, 3, size, size), (opt_batch, 3, size, size), (max_batch, 3, size, size))
    config.add_optimization_profile(profile)
    for flag in precision_flags(precision):   # TensorRT 10 only: --fp16 -> FP16, --int8 -> INT8 (Q/DQ scales)
        config.set_flag(getattr(trt.BuilderFlag, flag.lstrip("-").upper()))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ServeError(f"TensorRT failed to build a {precision} plan from '{src}'; see the TensorRT log above.")
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    ctx = engine.create_execution_context() if engine is not None else None
    if ctx is None or not ctx.set_input_shape(INPUT_NAME, (max_batch, 3, size, size)):
        raise ServeError(f"the built plan does not accept batch {max_batch}; it was not written.")
    plan.write_bytes(bytes(serialized))
    meta = {"compute_capability": cc, "precision": precision, "tensorrt": trt.__version__,
            "profile": [min_batch, opt_batch, max_batch], "onnx": src.name}
    _plan_meta_path(plan).write_text(json.dumps(meta, indent=2))
    report = {"plan": str(plan), **meta, "seconds": round(time.perf_counter() - t0, 1),
              "trtexec": shlex.join(argv).replace("<CC>", f"{major}{minor}")}
    (out / "trt_report.json").write_text(json.dumps(report, indent=2))
    return report


def check_plan(plan: str | Path, plan_cc: Optional[str], max_batch_size: int, preferred: Sequence[int] = ()) -> str:
    """Before `serve repository --plan` copies a plan: its ``<plan>.json`` must show the profile of this repository
    (``plan_profile``), the pinned TensorRT and a served GPU; returns the plan's compute capability."""
    meta_path = _plan_meta_path(plan)
    if not meta_path.is_file():
        raise ServeError(f"'{plan}' has no {meta_path.name} beside it, so its profile cannot be checked; build it with "
                         "'python -m serve trt' (which writes one), or let the init container build it.")
    meta = json.loads(meta_path.read_text())
    want = list(plan_profile(max_batch_size, preferred))
    if meta.get("profile") != want:
        raise ServeError(f"'{plan}' has profile min/opt/max {meta.get('profile')} but this repository needs {want} "
                         f"(max_batch_size {max_batch_size}); rebuild it with 'python -m serve trt' from this export.")
    if not str(meta.get("tensorrt", "")).startswith(ROW["tensorrt_pip"]):
        raise ServeError(f"'{plan}' was built by TensorRT {meta.get('tensorrt')} but Triton {SERVING['current']} loads "
                         f"TensorRT {ROW['tensorrt']} plans only; rebuild it with that TensorRT.")
    cc = str(meta.get("compute_capability"))
    if plan_cc and plan_cc != cc:
        raise ServeError(f"--plan-cc {plan_cc} but '{plan}' was built on a compute capability {cc} GPU; pass --plan-cc {cc}.")
    check_gpu_supported(cc)
    return cc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve.tensorrt", description=__doc__.splitlines()[0])
    ap.add_argument("--write-k8s", action="store_true", help="rewrite the rendered block of build-plans.sh")
    ap.add_argument("--check", action="store_true", help="exit 1 when build-plans.sh's block is out of date")
    ap.add_argument("--print-command", metavar="ONNX", help="print the trtexec build argv for ONNX (then exit)")
    ap.add_argument("--plan", default="model.plan")
    ap.add_argument("--precision", default="fp16", choices=PRECISIONS)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--preferred", type=int, nargs="*", default=[])
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--trtexec", default="trtexec")
    ap.add_argument("--print-verify", metavar="PLAN", help="print the max-batch load check of PLAN (--max-batch, --image-size)")
    ap.add_argument("--print-image-size", metavar="ONNX", help="print the input image size of ONNX")
    ap.add_argument("--parse-perf", metavar="LOG", help="print a trtexec log's performance summary as JSON")
    ap.add_argument("--fp16-onnx", nargs=2, metavar=("SRC", "DST"), help="write the fp16-typed copy of SRC to DST")
    a = ap.parse_args(argv)
    try:
        if a.fp16_onnx:
            print(write_fp16_onnx(*a.fp16_onnx))
            return 0
        if a.print_image_size:
            print(onnx_image_size(a.print_image_size))
            return 0
        if a.print_verify:
            s = a.image_size or 224
            print(shlex.join(verify_command(a.print_verify, a.max_batch, f"3x{s}x{s}", trtexec=a.trtexec)))
            return 0
        if a.parse_perf:
            print(json.dumps(parse_trtexec_perf(Path(a.parse_perf).read_text())))
            return 0
        if a.print_command:
            mn, opt, mx = plan_profile(a.max_batch, a.preferred)
            print(shlex.join(trtexec_command(a.print_command, a.plan, a.precision, mn, opt, mx, a.image_size,
                                             trtexec=a.trtexec)))
            return 0
    except ServeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    current = BUILD_PLANS_SCRIPT.read_text()
    wanted = script_with_block(current)
    if current == wanted:
        return 0
    if a.check:
        print(f"{BUILD_PLANS_SCRIPT} is out of date; run `python -m serve.tensorrt --write-k8s`.")
        return 1
    if a.write_k8s:
        BUILD_PLANS_SCRIPT.write_text(wanted)
        print(f"wrote {BUILD_PLANS_SCRIPT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
