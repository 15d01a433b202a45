"""The Triton model repository writer: reads an export folder (ONNX + serving spec + labels) and writes se_resnet50
(python+ONNX Runtime, onnxruntime_onnx or tensorrt_plan; fp32 or int8), preprocess, postprocess and the classify
ensemble as a self-contained folder: the python models' sources (serve/triton_runtime/), a verbatim copy of the eval
transform (train/transforms.py) and its spec as JSON are copied in, so the repository can be moved and served by a
python stub that cannot import this project."""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import re
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import serve.contract
import train.transforms
from serve.contract import (CHECKED_IMAGE, CLASSIFIER, DEFAULT_GPU_CCS, ENSEMBLE, ENSEMBLE_INPUT, EVAL_SPEC_FILE,
                            EXPORT_FP16_ONNX, EXPORT_INT8_CPU_ONNX, EXPORT_INT8_ONNX, EXPORT_ONNX, GUARD, INPUT_NAME,
                            OUTPUT_NAME, PIXELS, POSTPROCESS, PRECISIONS,
                            PREPROCESS, PREPROCESS_BACKENDS, REPOSITORY_MARKER, REPOSITORY_TARGETS, TARGETS, plan_filename)
from serve.errors import ServeError
from serve.settings import serve_settings
from serve.export import export_onnx, load_checkpoint, read_export, write_spec
from serve.model_config import (add_batching as _batching, add_jpeg_warmup, pb as _pb, python_batch, queue_limits,
                                request_bytes_limit, set_limits, set_param as _param)
from serve.repository_lock import writing
from serve.repository_dali import (add_guard_step, dali_preprocess_config, dali_preprocess_files, guard_config,
                                   require_checked_route)
from serve.tensorrt_qdq import require_tensorrt_qdq
from serve.tensorrt import check_plan, write_fp16_onnx

RUNTIME = Path(__file__).resolve().parent / "triton_runtime"   # python model sources, copied into version folders
MODEL_SOURCES = {CLASSIFIER: RUNTIME / "classifier.py", PREPROCESS: RUNTIME / "preprocess.py",
                 POSTPROCESS: RUNTIME / "postprocess.py", GUARD: RUNTIME / "guard.py"}
# train/transforms.py imports this from the project only for a type annotation (strings under
# `from __future__ import annotations`): the serving copy drops it and needs nothing else from the project.
ANNOTATION_ONLY_IMPORT = "from train.config import DataConfig"


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
        _param(cfg, "ONNX_FILE", EXPORT_ONNX)
        _param(cfg, "ORT_THREADS", ort_threads)
        # The preprocess instances decode on the same cores: an ORT pool that spins between runs takes their CPU
        # (measured on 2 cores, c=16: 79 -> 85 img/s with spinning off). "1" turns spinning back on.
        _param(cfg, "ORT_SPINNING", 0)
    elif target == "onnx":
        cfg.platform = "onnxruntime_onnx"
        cfg.default_model_filename = EXPORT_ONNX
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


def preprocess_config(serve_cfg, image_size: int, warmup_bytes: int, instances: int = 1, max_request_bytes: int = 0):
    """ModelConfig of `preprocess`: the decode limits as parameters; the eval-transform spec is eval_spec.json beside model.py."""
    mc = _pb()
    s = serve_cfg
    cfg = mc.ModelConfig(name=PREPROCESS, backend="python", max_batch_size=python_batch(s))   # /dev/shm bound
    cfg.input.add(name=ENSEMBLE_INPUT, data_type=mc.TYPE_UINT8, dims=[-1])
    cfg.output.add(name=PIXELS, data_type=mc.TYPE_FP32, dims=[3, image_size, image_size])
    request_cap = max_request_bytes or default_max_request_bytes(s)
    _batching(cfg, s, request_bytes=request_cap)   # its queue holds encoded requests: bounded in bytes
    cfg.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    _param(cfg, "EVAL_SPEC_FILE", EVAL_SPEC_FILE)
    set_limits(cfg, s, request_cap)
    _param(cfg, "TORCH_THREADS", 1)
    add_jpeg_warmup(cfg, ENSEMBLE_INPUT, warmup_bytes)
    return cfg


def default_max_request_bytes(serve_cfg) -> int:
    """Total encoded bytes one request may carry (serve/model_config.py)."""
    return request_bytes_limit(serve_cfg)


def postprocess_config(serve_cfg, num_classes: int):
    mc = _pb()
    cfg = mc.ModelConfig(name=POSTPROCESS, backend="python", max_batch_size=serve_cfg.max_batch_size)
    cfg.input.add(name="scores", data_type=mc.TYPE_FP32, dims=[num_classes])
    cfg.output.add(name=OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=[num_classes], label_filename="labels.txt")
    _batching(cfg, serve_cfg)  # one batched metrics record per execute()
    cfg.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    _param(cfg, "METRICS_MODEL", CLASSIFIER)
    return cfg


def ensemble_config(serve_cfg, num_classes: int, with_postprocess: bool, with_guard: bool = False):
    """`classify`: image bytes [-> guard] -> preprocess -> se_resnet50 [-> postprocess]; top-k through the
    classification extension. The guard step comes with the DALI preprocess."""
    mc = _pb()
    cfg = mc.ModelConfig(name=ENSEMBLE, platform="ensemble", max_batch_size=python_batch(serve_cfg))  # <= its steps
    cfg.input.add(name=ENSEMBLE_INPUT, data_type=mc.TYPE_UINT8, dims=[-1])
    cfg.output.add(name=OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=[num_classes], label_filename="labels.txt")
    steps = cfg.ensemble_scheduling.step
    source = add_guard_step(steps) if with_guard else ENSEMBLE_INPUT
    pre = steps.add(model_name=PREPROCESS, model_version=-1)
    pre.input_map[CHECKED_IMAGE if with_guard else ENSEMBLE_INPUT] = source
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


def eval_module_source() -> str:
    """train/transforms.py verbatim (the one eval transform), minus its annotation-only project import."""
    src = inspect.getsource(train.transforms)
    project = [l.strip() for l in src.splitlines() if re.match(r"\s*(from|import)\s+(train|serve|launch|scripts)\b", l)]
    if "from __future__ import annotations" not in src or any(l != ANNOTATION_ONLY_IMPORT for l in project):
        raise ServeError(f"train/transforms.py imports {', '.join(project) or 'project code'} at run time; the serving copy "
                         "must stand alone, so keep its project imports to the annotation-only DataConfig.")
    # Only a top-level import is commented out; one under `if TYPE_CHECKING:` never runs and stays as it is.
    body = re.sub(rf"^{re.escape(ANNOTATION_ONLY_IMPORT)}$", f"# {ANNOTATION_ONLY_IMPORT}  (annotation only: not needed when serving)",
                  src, flags=re.M)
    return "# Copied verbatim by serve.repository from train/transforms.py: the one eval transform. Do not edit.\n" + body


def runtime_files(model: str) -> dict[str, Path | bytes]:
    """Version-folder files of a python model: model.py and the modules it imports (no project code)."""
    return {"1/model.py": MODEL_SOURCES[model], "1/seresnet_serving.py": RUNTIME / "seresnet_serving.py",
            "1/seresnet_contract.py": Path(inspect.getsourcefile(serve.contract))}


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


def prepare_out(out_dir: str | Path) -> Path:
    """The repository folder, emptied of our models; a non-empty folder we did not write is refused (marker file)."""
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise ServeError(f"--out '{out_dir}' is a file; pass a new or empty folder for the repository.")
    ours = (out / REPOSITORY_MARKER).is_file() or (out / "repository.json").is_file()  # repository.json: older writers
    if out.is_dir() and any(out.iterdir()) and not ours:
        raise ServeError(f"--out '{out_dir}' is a non-empty folder that 'serve repository' did not write (no {REPOSITORY_MARKER}); "
                         "pass a new or empty folder.")
    for name in (CLASSIFIER, PREPROCESS, POSTPROCESS, ENSEMBLE, GUARD):
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPOSITORY_MARKER).write_text("written by python -m serve repository; it may overwrite this folder\n")
    return out


def _export_folder(source: Path, onnx_path: Optional[Path], precision: str, images, tmp: Path, out: Path,
                   target: str = "cpu") -> tuple[Path, Path]:
    """(export folder, ONNX file to serve) from an export folder, or from a checkpoint (exported first, or with
    ``onnx_path``). int8: the CPU target serves the CPU file, the GPU targets the TensorRT one (serve/quantize.py)."""
    name = (EXPORT_INT8_CPU_ONNX if target == "cpu" else EXPORT_INT8_ONNX) if precision == "int8" else EXPORT_ONNX
    if source.is_dir():
        return source, Path(onnx_path) if onnx_path else source / name
    if not source.is_file():
        raise ServeError(f"'{source}' does not exist; pass an export folder (python -m serve export) or a checkpoint.")
    if onnx_path is not None:
        _, cfg, classes = load_checkpoint(source)
        write_spec(tmp, cfg, classes, source)
        (tmp / EXPORT_ONNX).symlink_to(Path(onnx_path).resolve())
        return tmp, Path(onnx_path)
    if precision == "int8":
        raise ServeError("an int8 repository serves model.int8.onnx of an export folder; run 'python -m serve export' and "
                         "'python -m serve quantize --export DIR', then pass that folder instead of the checkpoint.")
    report = export_onnx(source, tmp, images=images)
    (out / "export_report.json").write_text(json.dumps(builder_paths_removed(report), indent=2))
    return tmp, tmp / EXPORT_ONNX


def builder_paths_removed(value):
    """``value`` (JSON-like) with every absolute path reduced to its file name: a repository names no path of the
    machine that wrote it."""
    if isinstance(value, dict):
        return {k: builder_paths_removed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [builder_paths_removed(v) for v in value]
    return Path(value).name if isinstance(value, str) and Path(value).is_absolute() else value


def write_model_repository(source: str | Path, out_dir: str | Path, target: str = "cpu", *, precision: str = "fp32",
                           onnx_path: Optional[str | Path] = None, plan: Optional[str | Path] = None,
                           plan_cc: Optional[str] = None, ort_tensorrt: bool = False, ort_threads: int = 0,
                           preprocess_instances: Optional[int] = None, images=None,
                           max_request_bytes: Optional[int] = None, preprocess: str = "python",
                           max_queue_size: Optional[int] = None, queue_timeout_ms: Optional[int] = None,
                           serve_overrides: Optional[list[str]] = None) -> Path:
    """Write a servable, self-contained Triton repository into ``out_dir`` and return its path.

    ``source``: an export folder (``python -m serve export``: model.onnx [+ model.int8.onnx], serving_spec.json,
    labels.txt) or, as a convenience, a checkpoint (exported first with the parity check, unless ``onnx_path`` is
    given). ``target``: 'cpu' (python backend + ONNX Runtime, for the local tritonserver), 'onnx'
    (onnxruntime_onnx, optionally with the TensorRT accelerator), 'tensorrt' (tensorrt_plan named per compute
    capability; the ONNX kept alongside for the init container; ``plan``/``plan_cc`` copy a plan built with
    ``python -m serve trt``) or 'int8' (= 'cpu' with ``precision='int8'``). ``precision='int8'`` serves the export
    folder's static QDQ file for the target: model.int8.cpu.onnx on 'cpu', model.int8.onnx (TensorRT's rules
    checked) on 'onnx' and 'tensorrt'. ``max_queue_size``/``queue_timeout_ms``: every batched model's bounded
    REJECT queue (default serve/model_config.py). ``preprocess``: 'python' (PIL, the training
    eval transform; any target) or 'dali' (GPU targets: `guard` checks each request without decoding, then DALI
    decodes on the GPU with the trainer's DALI eval graph). ``out_dir`` must be new, empty or a repository this
    writer made. ``serve_overrides``: ``serve.KEY=VALUE`` items over the export's serving settings (serve/settings.py).
    """
    if target == "int8":
        target, precision = "cpu", "int8"
    if target not in TARGETS:
        raise ServeError(f"unknown target '{target}'; choose one of {', '.join(REPOSITORY_TARGETS)}.")
    if preprocess not in PREPROCESS_BACKENDS:
        raise ServeError(f"unknown preprocess '{preprocess}'; choose one of {', '.join(PREPROCESS_BACKENDS)}.")
    if preprocess == "dali" and target == "cpu":
        raise ServeError("--preprocess dali decodes on a GPU; use it with --target onnx or tensorrt "
                         "(the cpu and int8 targets decode with the python preprocess).")
    if preprocess == "dali":
        require_checked_route()   # before anything in out_dir changes
    if precision not in PRECISIONS:
        raise ServeError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}.")
    if not Path(source).exists():
        raise ServeError(f"'{source}' does not exist; pass an export folder (python -m serve export) or a checkpoint.")
    if plan is not None and not Path(plan).is_file():
        raise ServeError(f"TensorRT plan '{plan}' does not exist; build it with 'python -m serve trt'.")
    with writing(out_dir), tempfile.TemporaryDirectory(prefix="seresnet-export-") as tmp:
        out = prepare_out(out_dir)
        export_dir, onnx = _export_folder(Path(source), Path(onnx_path) if onnx_path else None, precision, images, Path(tmp), out,
                                          target)
        spec = read_export(export_dir)
        if not onnx.is_file():
            hint = "'python -m serve quantize --export DIR'" if precision == "int8" else "'python -m serve export'"
            raise ServeError(f"ONNX model '{onnx}' does not exist; write it with {hint} first.")
        if precision == "int8" and target != "cpu":  # the init container builds a TensorRT plan from this file
            require_tensorrt_qdq(onnx, f"'{onnx}'")
        classes, ev, s = spec["classes"], spec["eval"], SimpleNamespace(**serve_settings(spec["serve"], serve_overrides or []))
        s.max_queue_size = max_queue_size or getattr(s, "max_queue_size", None)
        s.queue_timeout_ms = queue_timeout_ms or getattr(s, "queue_timeout_ms", None)
        n, size = len(classes), int(ev["image_size"])
        cls_files: dict[str, Path | bytes] = {f"1/{EXPORT_ONNX}": onnx}   # int8: the QDQ model under the served name
        if target == "cpu":
            cls_files.update(runtime_files(CLASSIFIER))
        if target == "tensorrt" and plan is not None:  # its profile, TensorRT and GPU first (serve.tensorrt.check_plan)
            plan_cc = check_plan(plan, plan_cc, s.max_batch_size, s.preferred_batch_sizes)
            cls_files[f"1/{plan_filename(plan_cc)}"] = Path(plan)
        if target != "cpu" and precision == "fp32":  # the init container's fp16 plan: built from an fp16-typed ONNX
            cls_files[f"1/{EXPORT_FP16_ONNX}"] = write_fp16_onnx(onnx, Path(tmp) / EXPORT_FP16_ONNX)
        cls_cfg = classifier_config(target, s, size, n, ort_threads=ort_threads, ort_tensorrt=ort_tensorrt)
        _param(cls_cfg, "PRECISION", precision)
        _write_model(out, CLASSIFIER, cls_cfg, cls_files, labels=classes)

        jpeg = _warmup_jpeg(size)
        request_cap = max_request_bytes or default_max_request_bytes(s)
        instances = preprocess_instances or s.preprocess_instances
        if preprocess == "dali":
            _write_model(out, GUARD, guard_config(s, instances, request_cap), runtime_files(GUARD))
            _write_model(out, PREPROCESS, dali_preprocess_config(s, size, len(jpeg)),
                         dali_preprocess_files(ev, s.max_batch_size, jpeg))
        else:
            pre_files = {**runtime_files(PREPROCESS), "1/seresnet_eval.py": eval_module_source().encode(),
                         f"1/{EVAL_SPEC_FILE}": json.dumps(ev, indent=2).encode(), "warmup/sample.jpg": jpeg}
            _write_model(out, PREPROCESS, preprocess_config(s, size, len(jpeg), instances, request_cap), pre_files)
        with_post = target != "cpu"  # the CPU classifier is python and records the metrics itself
        if with_post:
            _write_model(out, POSTPROCESS, postprocess_config(s, n), runtime_files(POSTPROCESS), labels=classes)
        _write_model(out, ENSEMBLE, ensemble_config(s, n, with_post, preprocess == "dali"), {}, labels=classes)
        (out / "repository.json").write_text(json.dumps({
            "source": Path(source).resolve().name, "checkpoint": builder_paths_removed(spec.get("checkpoint")), "target": target,
            "precision": precision, "preprocess": preprocess, "classes": classes, "eval_spec": ev,
            "onnx_sha256": hashlib.sha256(onnx.read_bytes()).hexdigest(),
            "serve": vars(s), "serve_overrides": list(serve_overrides or []),   # the settings served, after --set
            "limits": {"max_image_bytes": s.max_image_bytes, "max_image_pixels": s.max_image_pixels,
                       "max_request_bytes": request_cap, "max_queue_size": queue_limits(s)[0],
                       "max_queue_size_encoded": queue_limits(s, request_cap)[0],   # preprocess / guard: bytes-bounded
                       "queue_timeout_ms": queue_limits(s)[1] // 1000},
            "models": [CLASSIFIER] + ([GUARD] if preprocess == "dali" else []) + [PREPROCESS]
                      + ([POSTPROCESS] if with_post else []) + [ENSEMBLE],
        }, indent=2))
    return out
