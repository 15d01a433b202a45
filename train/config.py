"""The one typed config: YAML + ``--set a.b=c`` overrides, validated by pydantic, shared by train/serve/launch."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A user-facing configuration problem, one clear sentence."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    root: str = Field("data/animals", description="ImageFolder root holding train/, val/ and test/ of <class>/<image>.")
    backend: Literal["auto", "dali", "torchvision"] = Field(
        "auto", description="Input pipeline: DALI (GPU 'mixed' decode with a GPU, CPU otherwise), torchvision, or auto (DALI if installed).")
    image_size: int = Field(224, ge=8, description="Training crop and eval centre-crop size in pixels.")
    eval_resize: int = Field(256, ge=8, description="Eval: shorter side resized to this before the centre crop.")
    eval_reducing_gap: Optional[float] = Field(
        3.0, ge=1.0, description="Eval and serving: a large input is first shrunk by an integer factor (a JPEG in its decoder, others by a box filter), never below this multiple of eval_resize, then resized; null resizes in one pass (slower on large photos).")
    batch_size: int = Field(64, ge=1, description="Batch size per rank (per GPU).")
    workers: int = Field(2, ge=0, description="Loader worker processes (torchvision) or DALI CPU threads and file-reading threads per rank (files are read with plain reads, never mmap: safe on NFS/Lustre).")
    on_corrupt: Literal["fail", "skip"] = Field(
        "fail", description="What to do with unreadable images found at scan time: stop with their paths, or skip them and count.")
    mean: tuple[float, float, float] = Field((0.485, 0.456, 0.406), description="Normalisation mean (RGB, 0..1).")
    std: tuple[float, float, float] = Field((0.229, 0.224, 0.225), description="Normalisation std (RGB, 0..1).")
    scale_min: float = Field(0.8, gt=0, le=1, description="RandomResizedCrop minimum area fraction.")
    flip_p: float = Field(0.5, ge=0, le=1, description="Horizontal flip probability.")
    jitter: float = Field(0.2, ge=0, le=1, description="Brightness/contrast/saturation jitter strength.")
    rotate_deg: float = Field(15.0, ge=0, le=180, description="Random rotation range in degrees (+-).")
    class_weights: bool = Field(True, description="Weighted cross-entropy with inverse-frequency class weights from the training counts.")
    progressive_min_size: int = Field(0, ge=0, description="Progressive resizing: the first epochs train at this crop size, rising to image_size by progressive_until of the run (0 = off). Evaluation and serving always use image_size.")
    progressive_until: float = Field(0.75, gt=0, le=1, description="Fraction of the run by which progressive resizing reaches image_size.")
    verify: bool = Field(False, description="Decode every image once at start (slow on large sets); off: list files only, and a broken image met in training follows on_corrupt.")

    @model_validator(mode="after")
    def _resize_covers_crop(self):
        if min(self.std) <= 0:
            raise ValueError(f"data.std must be > 0 in every channel (got {list(self.std)}): normalisation divides by it")
        if self.progressive_min_size > self.image_size:
            raise ValueError(f"data.progressive_min_size ({self.progressive_min_size}) must be <= data.image_size ({self.image_size})")
        if self.eval_resize < self.image_size:
            raise ValueError(f"data.eval_resize ({self.eval_resize}) must be >= data.image_size ({self.image_size})")
        return self


class ModelConfig(_Section):
    name: Literal["se_resnet50", "resnet50"] = Field("se_resnet50", description="Architecture from the model registry.")
    se_placement: Literal["all", "layer4"] = Field("all", description="Squeeze-excitation in every bottleneck or in layer4 only.")
    se_reduction: int = Field(16, ge=1, description="SE channel reduction ratio.")
    stem: Literal["imagenet", "small"] = Field(
        "imagenet", description="'imagenet': 7x7/2 conv + max-pool; 'small': 3x3 conv, no max-pool (inputs of 64 px and below).")
    stem_stride: int = Field(1, ge=1, le=2, description="Stride of the small stem's 3x3 conv (1 keeps full resolution).")
    head: Literal["linear", "mlp"] = Field("linear", description="'mlp': Linear 2048->512, ReLU, Dropout 0.5, Linear (transfer learning).")
    pretrained: Optional[str] = Field(None, description="Local file: a torchvision ResNet-50 state dict or one of our checkpoints.")
    freeze_backbone: bool = Field(False, description="Train only the head (and SE blocks) at first.")
    unfreeze_after_epochs: int = Field(0, ge=0, description="With freeze_backbone: unfreeze layer3/layer4 after this many epochs (0 = never).")
    zero_init_residual: bool = Field(True, description="Zero-init each bottleneck's last BatchNorm gamma.")


class OptimConfig(_Section):
    name: Literal["sgd", "adamw"] = Field("sgd", description="Optimizer.")
    lr: float = Field(0.1, gt=0, description="Peak learning rate (for the global batch).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay (not applied to norms and biases).")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")
    lr_scaling: Literal["linear", "sqrt", "none"] = Field(
        "linear", description="How the peak lr follows the global batch (ranks x data.batch_size) relative to reference_batch; applied when an elastic job changes size.")
    reference_batch: int = Field(0, ge=0, description="Global batch that optim.lr is meant for (0 = the first attempt's global batch).")


class ScheduleConfig(_Section):
    name: Literal["cosine_warm_restarts", "cosine"] = Field(
        "cosine_warm_restarts", description="After warm-up: CosineAnnealingWarmRestarts or one plain cosine decay.")
    warmup_epochs: float = Field(1.0, ge=0, description="Linear warm-up length in epochs (fractions allowed).")
    T_0: float = Field(10, gt=0, description="Warm restarts: first cycle length in epochs.")
    T_mult: int = Field(2, ge=1, description="Warm restarts: cycle length multiplier.")
    eta_min: float = Field(1e-6, ge=0, description="Minimum learning rate.")


# DeepSpeed JSON keys the trainer derives from this config (train/backends.py); deepspeed.extra may not set them.
DEEPSPEED_DERIVED_KEYS = ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                          "zero_allow_untested_optimizer", "torch_autocast", "bf16", "fp16", "optimizer", "scheduler")
# zero_optimization sub-keys deepspeed.extra may set (the stage comes from deepspeed.zero_stage).
DEEPSPEED_ZERO_EXTRA_KEYS = ("reduce_bucket_size", "allgather_bucket_size")


class DeepSpeedConfig(_Section):
    zero_stage: int = Field(1, ge=0, le=3, description="ZeRO stage (0-2; 3 is refused: it would leave best.pt empty).")
    extra: dict[str, Any] = Field(default_factory=dict, description="Merged into the generated DeepSpeed JSON config (keys the trainer derives are refused; zero_optimization may set reduce_bucket_size and allgather_bucket_size, in elements, default 5e6 each).")

    @model_validator(mode="after")
    def _extra_does_not_override(self):
        clash = sorted(set(self.extra) & set(DEEPSPEED_DERIVED_KEYS))
        if clash:
            raise ValueError(f"deepspeed.extra may not set {', '.join(clash)}: the trainer derives them from data.batch_size, "
                             f"deepspeed.zero_stage, train.precision, optim.* and schedule.*; set those keys instead")
        zero = self.extra.get("zero_optimization", {})
        if not isinstance(zero, dict):
            raise ValueError("deepspeed.extra.zero_optimization must be a mapping of "
                             f"{' / '.join(DEEPSPEED_ZERO_EXTRA_KEYS)}")
        bad = sorted(set(zero) - set(DEEPSPEED_ZERO_EXTRA_KEYS))
        if bad:
            raise ValueError(f"deepspeed.extra.zero_optimization may set only {', '.join(DEEPSPEED_ZERO_EXTRA_KEYS)} "
                             f"(got {', '.join(bad)}); the stage is deepspeed.zero_stage")
        for key, value in zero.items():
            try:   # YAML 1.1 reads 5e6 as a string
                number = float(value) if not isinstance(value, bool) else 0.0
            except (TypeError, ValueError):
                number = 0.0
            if number < 1 or number != int(number):
                raise ValueError(f"deepspeed.extra.zero_optimization.{key} must be a whole number of elements >= 1 "
                                 f"(got {value!r})")
            zero[key] = int(number)
        return self


class TrainConfig(_Section):
    epochs: float = Field(90, gt=0, description="Epochs to train (fractions allowed).")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Autocast dtype: auto = bf16 where supported, fp16+GradScaler on older GPUs.")
    channels_last: Literal["auto", "on", "off"] = Field("auto", description="channels_last memory format (auto = on: faster on GPU, ~10% faster on CPU as measured).")
    seed: int = Field(0, description="Random seed (per-rank offsets derived from it).")
    resume: bool = Field(True, description="Resume from <output_dir>/checkpoints/last.pt when it exists.")
    checkpoint_every_steps: int = Field(500, ge=0, description="Write 'last' every N optimizer steps (0 = epoch ends only).")
    keep_last: int = Field(3, ge=1, description="Keep this many step checkpoints.")
    log_every_steps: int = Field(20, ge=1, description="metrics.jsonl / Prometheus update period in steps.")
    nan_policy: Literal["skip", "stop"] = Field("stop", description="Non-finite loss: skip the step or stop with a clear message.")
    max_nan_skips: int = Field(20, ge=0, description="With nan_policy=skip: stop after this many skipped steps.")
    eval_every_epochs: int = Field(1, ge=1, description="Validate every N epochs (and at the end).")
    threads: int = Field(0, ge=0, description="torch intra-op threads per rank on CPU (0 = cores / local ranks).")
    record_samples: bool = Field(False, description="Append each rank's trained sample indices to <output_dir>/samples/rank<r>.txt (checks sharding).")
    max_steps: int = Field(0, ge=0, description="Stop after this many optimizer steps in total (0 = no limit; for smoke tests).")
    time_budget: Optional[str] = Field(None, description="Wall-clock training budget (e.g. '15m', '2h', '8 GPU-hours' is '1h' on 8 GPUs): throughput is measured over the first steps, then the step count is fixed so the whole schedule ends when the budget does. Overrides epochs.")
    grad_compression: Literal["none", "fp16", "bf16"] = Field("none", description="DDP gradient all-reduce compression hook (saves inter-node bandwidth on slow networks; engine=ddp only).")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="Exponential moving average of the weights (0 = off, e.g. 0.999): the EMA model is evaluated, checkpointed and exported.")

    @field_validator("channels_last", mode="before")
    @classmethod
    def _yaml_on_off(cls, v):
        """YAML 1.1 reads a bare on/off as a boolean: accept it as the string it was meant to be."""
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class MetricsConfig(_Section):
    enabled: bool = Field(True, description="Expose Prometheus training metrics.")
    port: int = Field(9400, ge=0, le=65535, description="Base port; rank r listens on port + local_rank (0 = a free port).")
    address: str = Field("127.0.0.1", description="Bind address (0.0.0.0 inside a pod).")
    tensorboard: bool = Field(False, description="Also write TensorBoard scalars (loss, lr, images/s, val top-1) under <output_dir>/tensorboard on rank 0 (needs the tensorboard extra).")


class ClusterConfig(_Section):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)  # cpu: 32 -> "32"
    image: str = Field("ghcr.io/seresnet-stack/train:0.1.0", description="Training container image.")
    namespace: str = Field("ml", description="Kubernetes namespace.")
    nnodes: int = Field(1, ge=1, description="Worker pods (nodes).")
    max_nnodes: int = Field(0, ge=0, description="Elastic upper bound on nodes (0 = nnodes).")
    gpus_per_node: int = Field(8, ge=0, description="GPUs per pod; also torchrun --nproc-per-node.")
    cpu: str = Field("32", description="CPU request per pod.")
    memory: str = Field("256Gi", description="Memory request per pod.")
    shm_size: str = Field("64Gi", description="Memory-backed /dev/shm for DALI and NCCL.")
    max_restarts: int = Field(3, ge=0, description="torchrun/elastic restarts before the job fails.")
    gpu_arch: Optional[str] = Field(None, description="Compute capability of the cluster's GPUs (e.g. '7.0' V100, '8.0' A100, '9.0' H100): picks the training image and is checked by preflight.")
    data_pvc: str = Field("imagenet-data", description="PVC with the ImageFolder.")
    checkpoint_pvc: str = Field("seresnet-checkpoints", description="PVC for output_dir.")


class ServeConfig(_Section):
    max_batch_size: int = Field(32, ge=1, description="Triton max_batch_size of the classifier.")
    preferred_batch_sizes: list[int] = Field(default_factory=lambda: [8, 16, 32], description="Dynamic batching preferred sizes.")
    max_queue_delay_us: int = Field(2000, ge=0, description="Dynamic batching queue delay (microseconds).")
    instances: int = Field(1, ge=1, description="Instances of the classifier per device.")
    preprocess_instances: int = Field(2, ge=1, description="Instances of the python `preprocess` model (decode + eval transform run one request batch at a time per instance; 2 lets decoding use two CPU cores).")
    max_image_bytes: int = Field(20_000_000, ge=1, description="preprocess: largest encoded image accepted.")
    max_image_pixels: int = Field(40_000_000, ge=1, description="preprocess: largest decoded width*height accepted (decompression-bomb guard).")
    max_request_bytes: int = Field(40_000_000, ge=1, description="preprocess: largest total encoded bytes one request may carry.")

    @model_validator(mode="after")
    def _preferred_fit(self):
        bad = [b for b in self.preferred_batch_sizes if b < 1 or b > self.max_batch_size]
        if bad:
            raise ValueError(f"serve.preferred_batch_sizes {bad} must be between 1 and serve.max_batch_size ({self.max_batch_size})")
        return self


class Config(_Section):
    output_dir: str = Field("runs/train", description="Checkpoints, metrics.jsonl, report.json and the resolved config.")
    engine: Literal["ddp", "deepspeed"] = Field("ddp", description="Distributed engine (torchrun DDP, or DeepSpeed under torchrun).")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    train: TrainConfig = TrainConfig()
    metrics: MetricsConfig = MetricsConfig()
    cluster: ClusterConfig = ClusterConfig()
    serve: ServeConfig = ServeConfig()

    def to_dict(self) -> dict:
        return json.loads(self.model_dump_json())


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is a value, not a section.")
        node = child
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got '{item}'.")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got '{item}'.")
    return key, yaml.safe_load(raw) if raw.strip() else ""


def _explain(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        return f"Unknown config key '{where}'; see the config reference in README.md for valid keys."
    return f"Bad value for '{where}': {first['msg']} (got {first.get('input')!r})."


def config_from_dict(tree: dict) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None


PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"   # shipped in the wheel; configs/ links here in a checkout


def packaged_config_names() -> list[str]:
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """A YAML file, or a bare name (``demo``, ``imagenet``, ``smoke``) of a config shipped with the package."""
    p = Path(path)
    if p.is_file():
        return p
    if p.name == str(path) and not p.suffix and (PACKAGED_CONFIGS / f"{p.name}.yaml").is_file():
        return PACKAGED_CONFIGS / f"{p.name}.yaml"
    raise ConfigError(f"Config file '{p}' does not exist; pass --config with a YAML file or one of the packaged configs "
                      f"({', '.join(packaged_config_names())}).")


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load YAML (or defaults when ``path`` is None), apply ``key=value`` overrides, validate."""
    tree: dict = {}
    if path is not None:
        p = resolve_config_path(path)
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"Config file '{p}' is not valid YAML: {err}.") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"Config file '{p}' must hold a mapping of sections at the top level.")
    tree = copy.deepcopy(tree)
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return config_from_dict(tree)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_reference_markdown() -> str:
    """The README's config reference, generated from the models so it cannot drift."""
    lines = ["| key | default | description |", "|---|---|---|"]

    def walk(model_cls: type[BaseModel], prefix: str) -> None:
        for name, field in model_cls.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            lines.append(f"| `{prefix}{name}` | `{json.dumps(default)}` | {field.description or ''} |")

    walk(Config, "")
    return "\n".join(lines) + "\n"
