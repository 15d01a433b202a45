"""The one TensorRT plan recipe: optimisation profile from the serve config, the trtexec argv (build and the
max-batch load check), the shell block the Kubernetes init container (k8s/serving/base/build-plans.sh) runs,
and the Python-API builder for a GPU box.

Facts the recipe rests on (versions: train/compat.yaml, `serving:`):
- Triton refuses a plan whose profile max batch is below the model's ``max_batch_size`` ("engine only supports
  max-batch N"), so the profile is min 1, opt = the largest preferred batch size, max = ``serve.max_batch_size``,
  and the built plan is loaded at max batch (``trtexec --loadEngine --shapes``) before it replaces the ONNX.
- A plan only loads in the TensorRT version that built it ("version tag does not match"): plans are built by the
  trtexec of the Triton image's TensorRT (pinned in the table), never by whatever ``pip install tensorrt`` gets.
- int8 is explicit quantization only (Q/DQ nodes in the ONNX): implicit calibration (IInt8EntropyCalibrator2,
  trtexec --calib) is deprecated in TensorRT 10 and removed in 11, and an int8 build without it gets dummy ranges.

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

from serve.contract import CLASSIFIER, INPUT_NAME, plan_filename
from serve.errors import ServeError

PRECISIONS = ("fp32", "fp16", "int8")
WORKSPACE_MIB = 4096
BUILD_PLANS_SCRIPT = Path(__file__).resolve().parents[1] / "k8s" / "serving" / "base" / "build-plans.sh"
BEGIN_MARK = "# >>> rendered by `python -m serve.tensorrt --write-k8s` from serve/tensorrt.py: do not edit by hand"
END_MARK = "# <<< end of rendered block"
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def plan_profile(max_batch_size: int, preferred_batch_sizes: Sequence[int] = ()) -> tuple[int, int, int]:
    """(min, opt, max) batch of the optimisation profile: 1, the largest preferred size <= max, the model's max."""
    if int(max_batch_size) < 1:
        raise ServeError(f"serve.max_batch_size is {max_batch_size}; a TensorRT plan needs a max batch of at least 1.")
    fitting = [int(b) for b in preferred_batch_sizes if 1 <= int(b) <= int(max_batch_size)]
    return 1, (max(fitting) if fitting else int(max_batch_size)), int(max_batch_size)


def profile_from_config(serve_cfg) -> tuple[int, int, int]:
    """The profile for a ``ServeConfig`` (``serve:`` section of the training config)."""
    return plan_profile(serve_cfg.max_batch_size, serve_cfg.preferred_batch_sizes)


def _onnx_graph(onnx_path: str | Path):
    import onnx

    p = Path(onnx_path)
    if not p.is_file():
        raise ServeError(f"ONNX model '{p}' does not exist; run 'python -m serve export' first.")
    return onnx.load(str(p), load_external_data=False).graph


def onnx_image_size(onnx_path: str | Path) -> int:
    for inp in _onnx_graph(onnx_path).input:
        if inp.name == INPUT_NAME:
            return int([d.dim_value for d in inp.type.tensor_type.shape.dim][-1])
    raise ServeError(f"'{onnx_path}' has no input named '{INPUT_NAME}'; export it with 'python -m serve export'.")


def onnx_has_qdq(onnx_path: str | Path) -> bool:
    return any(n.op_type in QDQ_OPS for n in _onnx_graph(onnx_path).node)


def precision_flags(precision: str) -> list[str]:
    """trtexec precision flags (TensorRT 10). int8 = explicit Q/DQ: --int8 lets TensorRT honour the Q/DQ scales,
    --fp16 lets the layers outside Q/DQ pairs run in fp16 instead of fp32; no --calib (dummy ranges)."""
    if precision not in PRECISIONS:
        raise ServeError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}.")
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
    if precision == "int8" and Path(onnx_path).is_file() and not onnx_has_qdq(onnx_path):
        raise ServeError(f"'{onnx_path}' has no QuantizeLinear/DequantizeLinear nodes, so an int8 plan would use dummy ranges; "
                         "build int8 from the Q/DQ model of 'python -m serve quantize'.")
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


def init_container_script(onnx_path: str = "/repository/se_resnet50/1/model.onnx", model_dir: str = "",
                          precision: str = "fp16", max_batch: int = 32, opt_batch: Optional[int] = None,
                          image_size: int = 224, calib_cache: Optional[str] = None) -> str:
    """The init container's script (k8s/serving/base/build-plans.sh with the rendered block in place)."""
    del onnx_path, model_dir, precision, max_batch, opt_batch, image_size, calib_cache   # read from the repository at run time
    return script_with_block(BUILD_PLANS_SCRIPT.read_text())


_PERF_LINES = {"Throughput": "throughput_qps", "Latency": "latency_ms", "GPU Compute Time": "gpu_compute_ms"}


def parse_trtexec_perf(text: str) -> dict:
    """The performance summary of a ``trtexec --loadEngine`` run: throughput (batches/s) and latency stats (ms)."""
    import re

    out: dict = {}
    for line in text.splitlines():
        m = re.search(r"\] (Throughput|Latency|GPU Compute Time): (.*)$", line)
        if not m:
            continue
        key, rest = _PERF_LINES[m[1]], m[2]
        if key == "throughput_qps":
            out[key] = float(rest.split()[0])
        else:
            out[key] = {k.replace("percentile(", "p").rstrip("%)"): float(v)
                        for k, v in re.findall(r"([a-z]+|percentile\(\d+(?:\.\d+)?%\)) = ([\d.eE+-]+) ms", rest)}
    if "throughput_qps" not in out or "latency_ms" not in out:
        raise ServeError("trtexec printed no performance summary (Throughput/Latency lines); see its log.")
    return out


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


def build_plan(onnx_path: str | Path, out_dir: str | Path, precision: str = "fp16", min_batch: int = 1,
               opt_batch: Optional[int] = None, max_batch: int = 32, workspace_mib: int = WORKSPACE_MIB,
               checkpoint=None, calib_images: Sequence = (), calib_count: int = 0, calib_batch: int = 0,
               calib_cache=None) -> dict:
    """Build ``out_dir/model.sm<CC>.plan`` with the TensorRT Python API (same profile and flags as the trtexec
    recipe), then check it runs at max batch; returns a report. The calib_* arguments are accepted for old
    callers and refused when set: int8 comes from a Q/DQ ONNX."""
    del checkpoint, calib_images, calib_count, calib_batch
    onnx_path, out = Path(onnx_path), Path(out_dir)
    opt_batch = max_batch if opt_batch is None else opt_batch
    argv = trtexec_command(onnx_path, out / plan_filename("<CC>"), precision, min_batch, opt_batch, max_batch,
                           calib_cache=calib_cache, workspace_mib=workspace_mib)
    size = onnx_image_size(onnx_path)
    trt = _require_tensorrt()
    import torch

    major, minor = torch.cuda.get_device_capability()
    cc = f"{major}.{minor}"
    out.mkdir(parents=True, exist_ok=True)
    plan = out / plan_filename(cc)
    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ServeError(f"TensorRT could not parse '{onnx_path}': {errs}.")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (min_batch, 3, size, size), (opt_batch, 3, size, size), (max_batch, 3, size, size))
    config.add_optimization_profile(profile)
    for flag in precision_flags(precision):   # same flags as trtexec: --fp16 -> FP16, --int8 -> INT8 (Q/DQ scales)
        config.set_flag(getattr(trt.BuilderFlag, flag.lstrip("-").upper()))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ServeError(f"TensorRT failed to build a {precision} plan from '{onnx_path}'; see the TensorRT log above.")
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    ctx = engine.create_execution_context() if engine is not None else None
    if ctx is None or not ctx.set_input_shape(INPUT_NAME, (max_batch, 3, size, size)):
        raise ServeError(f"the built plan does not accept batch {max_batch}; it was not written.")
    plan.write_bytes(bytes(serialized))
    report = {"plan": str(plan), "compute_capability": cc, "precision": precision, "tensorrt": trt.__version__,
              "seconds": round(time.perf_counter() - t0, 1), "profile": [min_batch, opt_batch, max_batch],
              "trtexec": shlex.join(argv).replace("<CC>", f"{major}{minor}")}
    (out / "trt_report.json").write_text(json.dumps(report, indent=2))
    return report


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
    a = ap.parse_args(argv)
    try:
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
