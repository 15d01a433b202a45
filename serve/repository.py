"""The Triton model repository writer: se_resnet50 (python+ONNX Runtime, onnxruntime_onnx or tensorrt_plan), preprocess, postprocess, the classify ensemble."""
from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from serve.errors import ServeError
from serve.contract import (CLASSIFIER, DEFAULT_GPU_CCS, ENSEMBLE, ENSEMBLE_INPUT, INPUT_NAME, OUTPUT_NAME, PIXELS,
                            POSTPROCESS, PREPROCESS, TARGETS, plan_filename)
from serve.export import export_onnx

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SOURCES = PROJECT_ROOT / "model_repository"   # python models kept in git; copied into version folders
def _pb():
    from tritonclient.grpc import model_config_pb2 as mc

    return mc


def _param(cfg, key: str, value) -> None:
    cfg.parameters[key].string_value = str(value)


def _batching(cfg, serve_cfg) -> None:
    sizes = [s for s in serve_cfg.preferred_batch_sizes if s <= serve_cfg.max_batch_size]
    cfg.dynamic_batching.preferred_batch_size.extend(sizes)
    cfg.dynamic_batching.max_queue_delay_microseconds = serve_cfg.max_queue_delay_us


def classifier_config(target: str, serve_cfg, image_size: int, num_classes: int, ort_threads: int = 0,
                      ort_tensorrt: bool = False, trt_cache_dir: str = "/tmp/triton-trt-cache",
                      gpu_ccs=DEFAULT_GPU_CCS):
    """ModelConfig of `se_resnet50` for one target; the same input/output names and shapes in all three."""
    mc = _pb()
    cfg = mc.ModelConfig(name=CLASSIFIER, max_batch_size=serve_cfg.max_batch_size)
    cfg.input.add(name=INPUT_NAME, data_type=mc.TYPE_FP32, dims=[3, image_size, image_size])
    cfg.output.add(name=OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=[num_classes], label_filename="labels.txt")
    _batching(cfg, serve_cfg)
    group = cfg.instance_group.add(count=serve_cfg.instances)
    if target == "cpu":
        cfg.backend = "python"
        group.kind = mc.ModelInstanceGroup.KIND_CPU
        _param(cfg, "PROJECT_ROOT", PROJECT_ROOT)
        _param(cfg, "ONNX_FILE", "model.onnx")
        _param(cfg, "ORT_THREADS", ort_threads)
    elif target == "onnx":
        cfg.platform = "onnxruntime_onnx"
        cfg.default_model_filename = "model.onnx"
        if ort_tensorrt:
            acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
            acc.parameters["precision_mode"] = "FP16"
            acc.parameters["max_workspace_size_bytes"] = str(1 << 30)
            acc.parameters["trt_engine_cache_enable"] = "true"
            acc.parameters["trt_engine_cache_path"] = trt_cache_dir
    elif target == "tensorrt":
        cfg.platform = "tensorrt_plan"
        group.kind = mc.ModelInstanceGroup.KIND_GPU
        cfg.default_model_filename = "model.plan"
        for cc in gpu_ccs:
            cfg.cc_model_filenames[cc] = plan_filename(cc)
    else:
        raise ServeError(f"unknown target '{target}'; choose one of {', '.join(TARGETS)}.")
    warm = cfg.model_warmup.add(name="zeros", batch_size=1)
    warm.inputs[INPUT_NAME].data_type = mc.TYPE_FP32
    warm.inputs[INPUT_NAME].dims.extend([3, image_size, image_size])
    warm.inputs[INPUT_NAME].zero_data = True
    return cfg


def preprocess_config(cfg_all, warmup_bytes: int, instances: int = 1):
    """ModelConfig of `preprocess`: records the eval spec and the decode limits so serving reproduces the eval transform."""
    mc = _pb()
    d, s = cfg_all.data, cfg_all.serve
    cfg = mc.ModelConfig(name=PREPROCESS, backend="python", max_batch_size=s.max_batch_size)
    cfg.input.add(name=ENSEMBLE_INPUT, data_type=mc.TYPE_UINT8, dims=[-1])
    cfg.output.add(name=PIXELS, data_type=mc.TYPE_FP32, dims=[3, d.image_size, d.image_size])
    _batching(cfg, s)
    cfg.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    for key, value in {"PROJECT_ROOT": PROJECT_ROOT, "IMAGE_SIZE": d.image_size, "EVAL_RESIZE": d.eval_resize,
                       "MEAN": json.dumps(list(d.mean)), "STD": json.dumps(list(d.std)),
                       "MAX_IMAGE_BYTES": s.max_image_bytes, "MAX_IMAGE_PIXELS": s.max_image_pixels,
                       "TORCH_THREADS": 1}.items():
        _param(cfg, key, value)
    warm = cfg.model_warmup.add(name="sample_jpeg", batch_size=1)
    warm.inputs[ENSEMBLE_INPUT].data_type = mc.TYPE_UINT8
    warm.inputs[ENSEMBLE_INPUT].dims.append(warmup_bytes)
    warm.inputs[ENSEMBLE_INPUT].input_data_file = "sample.jpg"
    return cfg


def postprocess_config(serve_cfg, num_classes: int):
    mc = _pb()
    cfg = mc.ModelConfig(name=POSTPROCESS, backend="python", max_batch_size=serve_cfg.max_batch_size)
    cfg.input.add(name="scores", data_type=mc.TYPE_FP32, dims=[num_classes])
    cfg.output.add(name=OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=[num_classes], label_filename="labels.txt")
    cfg.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    _param(cfg, "PROJECT_ROOT", PROJECT_ROOT)
    _param(cfg, "METRICS_MODEL", CLASSIFIER)
    return cfg


def ensemble_config(serve_cfg, num_classes: int, with_postprocess: bool):
    """`classify`: image bytes -> preprocess -> se_resnet50 [-> postprocess]; top-k through the classification extension."""
    mc = _pb()
    cfg = mc.ModelConfig(name=ENSEMBLE, platform="ensemble", max_batch_size=serve_cfg.max_batch_size)
    cfg.input.add(name=ENSEMBLE_INPUT, data_type=mc.TYPE_UINT8, dims=[-1])
    cfg.output.add(name=OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=[num_classes], label_filename="labels.txt")
    steps = cfg.ensemble_scheduling.step
    pre = steps.add(model_name=PREPROCESS, model_version=-1)
    pre.input_map[ENSEMBLE_INPUT] = ENSEMBLE_INPUT
    pre.output_map[PIXELS] = PIXELS
    cls = steps.add(model_name=CLASSIFIER, model_version=-1)
    cls.input_map[INPUT_NAME] = PIXELS
    if with_postprocess:
        cls.output_map[OUTPUT_NAME] = "scores"
        post = steps.add(model_name=POSTPROCESS, model_version=-1)
        post.input_map["scores"] = "scores"
        post.output_map[OUTPUT_NAME] = OUTPUT_NAME
    else:
        cls.output_map[OUTPUT_NAME] = OUTPUT_NAME
    return cfg


def to_pbtxt(cfg) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def parse_pbtxt(text: str):
    """Parse config.pbtxt text as Triton's ModelConfig protobuf (raises on any unknown field or bad value)."""
    from google.protobuf import text_format

    return text_format.Parse(text, _pb().ModelConfig())


def _warmup_jpeg(size: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (max(size, 16) * 2, max(size, 16) * 2), (120, 90, 60)).save(buf, format="JPEG")
    return buf.getvalue()


def _write_model(out: Path, name: str, cfg, files: dict[str, Path | bytes], labels: Optional[list[str]] = None) -> None:
    d = out / name
    (d / "1").mkdir(parents=True, exist_ok=True)
    (d / "config.pbtxt").write_text(to_pbtxt(cfg))
    if labels is not None:
        (d / "labels.txt").write_text("".join(f"{c}\n" for c in labels))
    for rel, src in files.items():
        dst = d / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            dst.write_bytes(src)
        else:
            shutil.copyfile(src, dst)


def write_model_repository(checkpoint: str | Path, out_dir: str | Path, target: str = "cpu", *,
                           onnx_path: Optional[str | Path] = None, plan: Optional[str | Path] = None,
                           plan_cc: Optional[str] = None, ort_tensorrt: bool = False, ort_threads: int = 0,
                           preprocess_instances: Optional[int] = None, images=None) -> Path:
    """Write a servable Triton repository for ``checkpoint`` into ``out_dir`` and return its path.

    Exports ONNX (with the parity check) unless ``onnx_path`` is given. ``target``: 'cpu' (python backend +
    ONNX Runtime, for the local tritonserver), 'onnx' (onnxruntime_onnx, optionally with the TensorRT
    accelerator) or 'tensorrt' (tensorrt_plan named per compute capability; ONNX kept alongside as fallback
    for the init container; ``plan``/``plan_cc`` copy a plan built with ``python -m serve trt``).
    """
    from serve.export import load_checkpoint

    if target not in TARGETS:
        raise ServeError(f"unknown target '{target}'; choose one of {', '.join(TARGETS)}.")
    out = Path(out_dir).resolve()
    if out == SOURCES.resolve():
        raise ServeError(f"--out '{out_dir}' is the folder of model sources kept in git; write the repository elsewhere (e.g. runs/model_repository).")
    _, cfg, classes = load_checkpoint(checkpoint)
    for name in (CLASSIFIER, PREPROCESS, POSTPROCESS, ENSEMBLE):
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    tmp = None
    if onnx_path is None:
        tmp = tempfile.TemporaryDirectory(prefix="seresnet-export-")
        report = export_onnx(checkpoint, tmp.name, images=images)
        (out / "export_report.json").write_text(json.dumps(report, indent=2))
        onnx_path = Path(tmp.name) / "model.onnx"
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ServeError(f"ONNX model '{onnx_path}' does not exist; run 'python -m serve export' first.")
    n, size, s = len(classes), cfg.data.image_size, cfg.serve

    cls_files: dict[str, Path | bytes] = {"1/model.onnx": onnx_path}
    if target == "cpu":
        cls_files["1/model.py"] = SOURCES / "se_resnet50_onnxruntime" / "model.py"
    if target == "tensorrt" and plan is not None:
        if not Path(plan).is_file():
            raise ServeError(f"TensorRT plan '{plan}' does not exist; build it with 'python -m serve trt'.")
        cls_files[f"1/{plan_filename(plan_cc) if plan_cc else 'model.plan'}"] = Path(plan)
    _write_model(out, CLASSIFIER, classifier_config(target, s, size, n, ort_threads=ort_threads, ort_tensorrt=ort_tensorrt),
                 cls_files, labels=classes)

    jpeg = _warmup_jpeg(size)
    _write_model(out, PREPROCESS, preprocess_config(cfg, len(jpeg), preprocess_instances or s.preprocess_instances),
                 {"1/model.py": SOURCES / "preprocess" / "model.py", "warmup/sample.jpg": jpeg})
    with_post = target != "cpu"  # the CPU classifier is python and records the metrics itself
    if with_post:
        _write_model(out, POSTPROCESS, postprocess_config(s, n), {"1/model.py": SOURCES / "postprocess" / "model.py"},
                     labels=classes)
    _write_model(out, ENSEMBLE, ensemble_config(s, n, with_post), {}, labels=classes)
    if tmp is not None:
        tmp.cleanup()
    (out / "repository.json").write_text(json.dumps({
        "checkpoint": str(Path(checkpoint).resolve()), "target": target, "classes": classes,
        "eval_spec": {"image_size": size, "eval_resize": cfg.data.eval_resize, "mean": list(cfg.data.mean), "std": list(cfg.data.std)},
        "limits": {"max_image_bytes": s.max_image_bytes, "max_image_pixels": s.max_image_pixels},
        "models": [CLASSIFIER, PREPROCESS] + ([POSTPROCESS] if with_post else []) + [ENSEMBLE],
    }, indent=2))
    return out
