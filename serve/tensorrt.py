"""TensorRT plans from the exported ONNX: the Python API builder (optimization profile, int8 entropy calibration with a cache) and the equivalent trtexec command for the Kubernetes init container."""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from serve.errors import ServeError
from serve.contract import INPUT_NAME, plan_filename

PRECISIONS = ("fp32", "fp16", "int8")


def onnx_image_size(onnx_path: str | Path) -> int:
    import onnx

    p = Path(onnx_path)
    if not p.is_file():
        raise ServeError(f"ONNX model '{p}' does not exist; run 'python -m serve export' first.")
    model = onnx.load(str(p), load_external_data=False)
    for inp in model.graph.input:
        if inp.name == INPUT_NAME:
            dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
            return int(dims[-1])
    raise ServeError(f"'{p}' has no input named '{INPUT_NAME}'; export it with 'python -m serve export'.")


def trtexec_command(onnx_path: str | Path, plan_path: str | Path, precision: str = "fp16", min_batch: int = 1,
                    opt_batch: int = 16, max_batch: int = 32, image_size: Optional[int] = None,
                    calib_cache: Optional[str | Path] = None, workspace_mib: int = 4096) -> list[str]:
    """The trtexec argv that builds the same plan as :func:`build_plan` (what the init container runs)."""
    if precision not in PRECISIONS:
        raise ServeError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}.")
    s = image_size or onnx_image_size(onnx_path)
    shape = lambda b: f"{INPUT_NAME}:{b}x3x{s}x{s}"  # noqa: E731
    cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={plan_path}", f"--minShapes={shape(min_batch)}",
           f"--optShapes={shape(opt_batch)}", f"--maxShapes={shape(max_batch)}", f"--memPoolSize=workspace:{workspace_mib}M"]
    if precision == "fp16":
        cmd.append("--fp16")
    elif precision == "int8":
        cmd += ["--int8", "--fp16"] + ([f"--calib={calib_cache}"] if calib_cache else [])
    return cmd


def init_container_script(onnx_path: str, model_dir: str, precision: str = "fp16", max_batch: int = 32,
                          opt_batch: int = 16, image_size: int = 224, calib_cache: Optional[str] = None) -> str:
    """Shell for the init container: name the plan after this GPU's compute capability, build it once, keep it cached."""
    cmd = trtexec_command(onnx_path, f"{model_dir}/model.sm${{CC}}.plan", precision, 1, opt_batch, max_batch,
                          image_size, calib_cache)
    quoted = " ".join(shlex.quote(c) if "${CC}" not in c else f'"{c}"' for c in cmd)
    return ("set -eu\n"
            "CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d '.[:space:]')\n"
            f'if [ ! -s "{model_dir}/model.sm${{CC}}.plan" ]; then {quoted}; fi\n')


def _require_tensorrt():
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError:
        raise ServeError("TensorRT is not installed here (import tensorrt failed); build plans on a GPU node with the "
                         "tensorrt extra, or run the printed trtexec command in the Triton container.") from None
    import torch

    if not torch.cuda.is_available():
        raise ServeError("TensorRT needs a CUDA GPU and none is visible; build the plan on a GPU node or with the trtexec init container.")
    return trt


def _calibrator_class(trt):
    import torch

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        """Feeds batches of eval-transformed training images from GPU memory; reads/writes a calibration cache."""

        def __init__(self, batches: Sequence[np.ndarray], cache: Path):
            super().__init__()
            self.batches, self.cache, self.i = list(batches), cache, 0
            self.device = torch.empty(self.batches[0].shape, dtype=torch.float32, device="cuda")

        def get_batch_size(self) -> int:
            return int(self.batches[0].shape[0])

        def get_batch(self, names):  # noqa: ARG002
            if self.i >= len(self.batches):
                return None
            self.device.copy_(torch.from_numpy(self.batches[self.i]))
            self.i += 1
            return [int(self.device.data_ptr())]

        def read_calibration_cache(self):
            return self.cache.read_bytes() if self.cache.is_file() else None

        def write_calibration_cache(self, cache) -> None:
            self.cache.write_bytes(bytes(cache))

    return EntropyCalibrator


def calibration_batches(checkpoint: str | Path, images: Sequence[str | Path], count: int, batch: int) -> list[np.ndarray]:
    from serve.export import eval_batch, load_checkpoint
    from serve.samples import find_images

    _, cfg, _ = load_checkpoint(checkpoint)
    files = find_images(images)[:count]
    if len(files) < batch:
        raise ServeError(f"int8 calibration needs at least {batch} images and found {len(files)}; pass --calib-images DIR (training split).")
    files = files[: len(files) - len(files) % batch]
    return [eval_batch([p.read_bytes() for p in files[i:i + batch]], cfg).numpy() for i in range(0, len(files), batch)]


def build_plan(onnx_path: str | Path, out_dir: str | Path, precision: str = "fp16", min_batch: int = 1,
               opt_batch: int = 16, max_batch: int = 32, workspace_mib: int = 4096,
               checkpoint: Optional[str | Path] = None, calib_images: Sequence[str | Path] = (), calib_count: int = 512,
               calib_batch: int = 16, calib_cache: Optional[str | Path] = None) -> dict:
    """Build ``out_dir/model.sm<CC>.plan`` with the TensorRT Python API; returns a report (path, cc, seconds, trtexec)."""
    import time

    if precision not in PRECISIONS:
        raise ServeError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}.")
    onnx_path, out = Path(onnx_path), Path(out_dir)
    size = onnx_image_size(onnx_path)
    trt = _require_tensorrt()
    import torch

    major, minor = torch.cuda.get_device_capability()
    cc = f"{major}.{minor}"
    out.mkdir(parents=True, exist_ok=True)
    plan = out / plan_filename(cc)
    cache = Path(calib_cache) if calib_cache else out / "calibration.cache"
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
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        if cache.is_file():
            batches = [np.zeros((calib_batch, 3, size, size), np.float32)]  # the cache answers; no images needed
        else:
            if checkpoint is None:
                raise ServeError("int8 calibration needs --checkpoint (for the eval transform) and --calib-images, or an existing --calib-cache.")
            batches = calibration_batches(checkpoint, calib_images, calib_count, calib_batch)
        calibrator = _calibrator_class(trt)(batches, cache)
        config.int8_calibrator = calibrator
        config.set_calibration_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ServeError(f"TensorRT failed to build a {precision} plan from '{onnx_path}'; see the TensorRT log above.")
    plan.write_bytes(bytes(serialized))
    report = {"plan": str(plan), "compute_capability": cc, "precision": precision, "tensorrt": trt.__version__,
              "seconds": round(time.perf_counter() - t0, 1), "profile": [min_batch, opt_batch, max_batch],
              "calibration_cache": str(cache) if precision == "int8" else None,
              "trtexec": shlex.join(trtexec_command(onnx_path, plan, precision, min_batch, opt_batch, max_batch, size,
                                                    cache if precision == "int8" else None, workspace_mib))}
    (out / "trt_report.json").write_text(json.dumps(report, indent=2))
    return report
