"""Names that several places must agree on: Triton model and tensor names, targets, plan file names.

The repository writer, the clients, the TensorRT plan recipe, the Kubernetes init container and the tests all
read these; change a name here and nowhere else."""
from __future__ import annotations

# Triton models of the generated repository
CLASSIFIER = "se_resnet50"      # the network (python/onnxruntime/tensorrt)
PREPROCESS = "preprocess"       # encoded bytes -> normalised pixels (one eval transform, shared with training)
POSTPROCESS = "postprocess"     # probabilities -> classification extension answer
ENSEMBLE = "classify"           # the one model clients call
GUARD = "guard"                 # --preprocess dali: python request checks in front of the DALI decoder (no decode)

# Tensors
ENSEMBLE_INPUT = "image"        # TYPE_UINT8, dims [-1], batched: encoded JPEG/PNG bytes
PIXELS = "pixels"               # preprocess -> classifier
CHECKED_IMAGE = "checked_image" # guard -> DALI preprocess: the same bytes, only for requests that passed
INPUT_NAME = "input"            # ONNX/plan input: float32 [N, 3, S, S], normalised pixels
OUTPUT_NAME = "probabilities"   # ONNX/plan/ensemble output: float32 [N, num_classes], softmax

# Repository targets
TARGETS = ("cpu", "onnx", "tensorrt")
# How `preprocess` decodes: the python model (PIL, the training eval transform) on any target, or DALI (nvJPEG on the
# GPU, the trainer's DALI eval graph) on the GPU targets.
PREPROCESS_BACKENDS = ("python", "dali")
DALI_PIPELINE_FILE = "dali.py"          # preprocess/1/ with DALI: autoserialized by the DALI backend at load
DALI_EVAL_FILE = "seresnet_dali_eval.py"  # beside it: train/dali_eval.py verbatim
DALI_PARAMS_FILE = "dali_params.json"   # beside it: input name, batch size, threads

# TensorRT plans are per GPU architecture: Triton's cc_model_filenames picks the file for the serving GPU.
# Turing, Ampere (A100, A10/A40), Ada (L4/L40), Hopper (H100/H200), Blackwell (B200 = 10.0, RTX PRO/5090 = 12.0).
DEFAULT_GPU_CCS = ("7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0")


def plan_filename(cc: str) -> str:
    """The plan file name for a GPU compute capability ('8.0' -> 'model.sm80.plan', '10.0' -> 'model.sm100.plan')."""
    return f"model.sm{cc.replace('.', '')}.plan"

# Export folder (`python -m serve export`): what the repository writer reads.
EXPORT_ONNX = "model.onnx"              # fp32, softmax in the graph
EXPORT_FP16_ONNX = "model.fp16.onnx"    # its fp16-typed copy (fp32 input/output): what a TensorRT 11 fp16 plan is built from
# Static QDQ int8 (`python -m serve quantize`), one file per kind of runtime (serve/quantize.py says why):
EXPORT_INT8_ONNX = "model.int8.onnx"          # symmetric int8, no int32 biases: TensorRT (and ONNX Runtime on GPUs)
EXPORT_INT8_CPU_ONNX = "model.int8.cpu.onnx"  # uint8 activations, int32 biases: the fastest on CPUs (ONNX Runtime)
INT8_TARGETS = ("cpu", "tensorrt")            # `serve quantize --target`: which of the two files to write
EXPORT_LABELS = "labels.txt"            # one class name per line, index order
EXPORT_SPEC = "serving_spec.json"       # {"eval": eval-transform spec, "serve": limits and batching, "classes": [...]}
PRECISIONS = ("fp32", "int8")
# `int8` is a repository target too: the CPU route (python + ONNX Runtime) serving model.int8.cpu.onnx.
REPOSITORY_TARGETS = TARGETS + ("int8",)

# Inside a generated repository
EVAL_SPEC_FILE = "eval_spec.json"       # preprocess/1/: the eval-transform spec as data
REPOSITORY_MARKER = ".seresnet-repository"  # written first: `serve repository --out` only overwrites folders holding it

# Custom Triton metrics recorded by the python models (dashboards and alerts use these names).
CONFIDENCE_METRIC = "seresnet_prediction_confidence"
CLASS_METRIC = "seresnet_predicted_class_total"
NONFINITE_METRIC = "seresnet_nonfinite_predictions_total"
REJECTED_METRIC = "seresnet_preprocess_rejected_total"   # label reason: one of REJECT_REASONS
REJECT_REASONS = ("format", "image_bytes", "request_bytes", "pixels", "decode", "shape")
