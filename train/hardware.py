"""Every hardware-dependent decision of a training job, made once from facts: precision, data backend, channels_last,
and the problems that must stop a job before its first kernel (no sm_70 kernels in a cu130 build, GPUs allocated but
CUDA unusable, emulated bf16 on Volta/Turing, ...).

``local_facts()`` reads this machine; ``described_facts(gpu_arch)`` describes a remote cluster node for
``python -m launch preflight --gpu-arch X.Y``. ``decide(cfg, facts)`` is the one rule book, used by the engine at every
job start and by preflight, and testable here by feeding it facts."""
from __future__ import annotations

import importlib.util
import os
import resource
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from train.compat import image_for_arch
from train.config import Config
from train.dali import gpu_memory_mib

# Environment variables through which a scheduler hands a process its GPUs: Kubernetes' device plugin and
# `docker --gpus` (NVIDIA_VISIBLE_DEVICES), Slurm/torchrun users (CUDA_VISIBLE_DEVICES).
GPU_ENV = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")
NATIVE_BF16_MIN_ARCH = (8, 0)   # Ampere: bf16 tensor cores; below it torch emulates bf16 (is_bf16_supported counts that)


@dataclass(frozen=True)
class Facts:
    """What decides a job's set-up. Described facts (a remote node) carry ``described=True``."""
    gpu_arch: Optional[str] = None          # "7.0", "9.0"; None without a usable GPU
    gpu_count: int = 0
    gpus_allocated: list[str] = field(default_factory=list)   # "CUDA_VISIBLE_DEVICES=0,1"
    cuda_usable: bool = False
    torch_version: str = torch.__version__
    torch_cuda: Optional[str] = torch.version.cuda
    torch_cuda_archs: list[str] = field(default_factory=list)  # torch.cuda.get_arch_list(): "sm_75", ...
    cpu_fast_bf16: bool = False
    dali_installed: bool = False
    deepspeed_installed: bool = False
    described: bool = False
    rdma: Optional[str] = None              # how NCCL is told to use RDMA/InfiniBand ("NCCL_IB_HCA=mlx5_0"), None if not
    memlock_bytes: int = -1                 # soft RLIMIT_MEMLOCK (`ulimit -l`), -1 = unlimited
    cap_ipc_lock: bool = False              # CAP_IPC_LOCK in the effective set (/proc/self/status CapEff)
    gpu_memory_bytes: Optional[int] = None  # total memory of one GPU; None when unknown


@dataclass
class Plan:
    """What the job will do on those facts; ``problems`` non-empty means it must not start."""
    device: str
    precision: str
    data_backend: str
    channels_last: bool
    grad_scaler: bool
    gpu_arch: Optional[str]
    torch_version: str
    torch_cuda_archs: list[str]
    image: Optional[str]
    max_batch_per_gpu: Optional[int] = None   # the largest data.batch_size estimated to fit one GPU (memory_plan)
    memory_mib: Optional[dict] = None         # that estimate's parts
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: without them CPU bf16 autocast is emulated (measured ~0.1x fp32 on an AVX2 EPYC)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _allocated_gpus() -> list[str]:
    out = []
    for name in GPU_ENV:
        v = os.environ.get(name, "").strip()
        if v and v.lower() not in ("none", "void", "-1", ""):
            out.append(f"{name}={v}")
    return out


CAP_IPC_LOCK = 14   # linux/capability.h


def rdma_configured(env=os.environ) -> Optional[str]:
    """How NCCL is told to use RDMA/InfiniBand: NCCL_IB_HCA names HCAs (what `launch k8s --rdma` sets), unless
    NCCL_IB_DISABLE=1 turns the IB transport off. None when neither says so."""
    if env.get("NCCL_IB_DISABLE", "0").strip() == "1":
        return None
    return f"NCCL_IB_HCA={env['NCCL_IB_HCA']}" if env.get("NCCL_IB_HCA", "").strip() else None


def memlock_limit() -> int:
    """The soft RLIMIT_MEMLOCK of this process in bytes (`ulimit -l` x 1024), -1 when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return -1 if soft == resource.RLIM_INFINITY else int(soft)


def has_effective_cap(bit: int, status: str = "/proc/self/status") -> bool:
    """Whether capability ``bit`` is in this process's effective set (the CapEff mask of /proc/self/status)."""
    try:
        for line in Path(status).read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def local_facts() -> Facts:
    usable = torch.cuda.is_available()
    arch, memory = None, None
    if usable:
        major, minor = torch.cuda.get_device_capability(0)
        arch = f"{major}.{minor}"
        memory = int(torch.cuda.get_device_properties(0).total_memory)
    return Facts(gpu_arch=arch, gpu_count=torch.cuda.device_count() if usable else 0, gpus_allocated=_allocated_gpus(),
                 cuda_usable=usable, torch_cuda_archs=list(torch.cuda.get_arch_list()), cpu_fast_bf16=cpu_has_fast_bf16(),
                 dali_installed=_installed("nvidia.dali"), deepspeed_installed=_installed("deepspeed"),
                 rdma=rdma_configured(), memlock_bytes=memlock_limit(), cap_ipc_lock=has_effective_cap(CAP_IPC_LOCK),
                 gpu_memory_bytes=memory)


def described_facts(gpu_arch: str, gpus: int = 1, gpu_memory_gb: Optional[float] = None) -> Facts:
    """A remote node with GPUs of compute capability ``gpu_arch`` (and ``gpu_memory_gb`` GB each, when given),
    running this very torch build."""
    parse_arch(gpu_arch)
    if gpu_memory_gb is not None and gpu_memory_gb <= 0:
        raise ValueError(f"GPU memory '{gpu_memory_gb}' GB must be > 0, e.g. 16 for a V100 16GB or 80 for an H100.")
    return Facts(gpu_arch=gpu_arch, gpu_count=gpus, gpus_allocated=[f"nvidia.com/gpu={gpus}"], cuda_usable=True,
                 torch_cuda_archs=list(torch.cuda.get_arch_list()), dali_installed=_installed("nvidia.dali"),
                 deepspeed_installed=_installed("deepspeed"), described=True,
                 gpu_memory_bytes=int(gpu_memory_gb * 2**30) if gpu_memory_gb else None)


# Training memory of one GPU. Activations saved for backward by SE-ResNet50 at 224 px, channels_last, measured with
# torch.autograd.graph.saved_tensors_hooks: 157 MiB per image in fp32, 79 MiB under bf16/fp16 autocast (torchvision
# ResNet-50: 131 / 66); they scale with the crop's pixels. On top: backward's transient gradient buffers
# (ACTIVATION_HEADROOM), the CUDA context with cuDNN/cuBLAS workspaces, weights + gradients + optimizer state, DALI's
# buffers (train.dali.gpu_memory_mib) and the caching allocator's fragmentation (ALLOCATOR_FILL).
ACTIVATION_MIB_224 = {"fp32": 157.0, "bf16": 79.0, "fp16": 79.0}
ACTIVATION_HEADROOM = 1.25
CUDA_CONTEXT_MIB = 1024.0
ALLOCATOR_FILL = 0.92
PARAMETERS = {"se_resnet50": 28_088_024, "resnet50": 25_557_032}   # with the 1000-class head
OPTIMIZER_STATE_BYTES = {"sgd": 4, "adamw": 8}                      # per parameter (momentum; exp_avg + exp_avg_sq)


def memory_plan(cfg: Config, precision: str, data_backend_: str, gpu_memory_bytes: int) -> tuple[int, dict]:
    """(largest batch per GPU estimated to fit, the parts in MiB) for SE-ResNet50 training on one GPU."""
    size = cfg.data.image_size
    per_image = ACTIVATION_MIB_224[precision] * ACTIVATION_HEADROOM * (size / 224) ** 2
    state = PARAMETERS[cfg.model.name] * (4 + 4 + OPTIMIZER_STATE_BYTES[cfg.optim.name]) / 2**20
    dali = gpu_memory_mib(cfg.data) if data_backend_ == "dali" else {"fixed": 0.0, "per_image": 0.0}
    usable = gpu_memory_bytes / 2**20 * ALLOCATOR_FILL - CUDA_CONTEXT_MIB - state - dali["fixed"]
    max_batch = max(0, int(usable // (per_image + dali["per_image"])))
    parts = {"gpu": round(gpu_memory_bytes / 2**20), "cuda_context": CUDA_CONTEXT_MIB, "model_state": round(state),
             "dali_fixed": round(dali["fixed"]), "per_image": round(per_image + dali["per_image"], 1),
             "at_batch": round((CUDA_CONTEXT_MIB + state + dali["fixed"]
                                + cfg.data.batch_size * (per_image + dali["per_image"])) / ALLOCATOR_FILL)}
    return max_batch, parts


def parse_arch(arch: str) -> tuple[int, int]:
    try:
        major, minor = (int(x) for x in str(arch).split("."))
    except ValueError:
        raise ValueError(f"GPU arch '{arch}' is not a compute capability like 7.0, 8.0 or 9.0.") from None
    return major, minor


def arch_supported(arch: str, torch_archs: list[str]) -> bool:
    """Whether a build with ``torch_archs`` runs on compute capability ``arch``: torch's own rule
    (torch.cuda._code_compatible_with_device, which _check_capability applies at CUDA init), falling back to
    "same major, SASS minor <= device minor" when that private helper is absent."""
    major, minor = parse_arch(arch)
    device_cc = 10 * major + minor
    codes = []
    for a in torch_archs:
        if a.startswith(("sm_", "compute_")):
            codes.append(int(a.split("_", 1)[1].rstrip("af")))
    check = getattr(torch.cuda, "_code_compatible_with_device", None)
    for code in codes:
        if check is not None and torch.version.cuda is not None:
            try:
                if check(device_cc, code):
                    return True
                continue
            except Exception:  # noqa: BLE001 - private helper changed shape: use the plain rule below
                pass
        if code // 10 == major and code % 10 <= minor:
            return True
    return False


def _image_hint(arch: str) -> str:
    try:
        name, row = image_for_arch(arch)
    except KeyError:
        return "no training image in train/compat.yaml serves it"
    return f"use the '{name}' training image ({row['dockerfile']}, torch {row['tag_suffix']})"


def data_backend(requested: str, dali_installed: bool) -> str:
    """The input pipeline for data.backend: 'auto' is DALI where it is installed (GPU 'mixed' decode with a GPU, its
    CPU pipeline otherwise), else torchvision; an explicit choice stands (decide() reports a missing DALI)."""
    if requested == "auto":
        return "dali" if dali_installed else "torchvision"
    return requested


def decide(cfg: Config, facts: Facts, engine: Optional[str] = None) -> Plan:
    """The rule book. Same code for the job start and ``launch preflight``."""
    engine = engine or cfg.engine
    t = cfg.train
    problems: list[str] = []
    notes: list[str] = []
    gpu = facts.cuda_usable and facts.gpu_arch is not None
    device = "cuda" if gpu else "cpu"
    build = f"torch {facts.torch_version}" + (f" (CUDA {facts.torch_cuda})" if facts.torch_cuda else " (CPU build)")

    if facts.gpus_allocated and not facts.cuda_usable:
        problems.append(f"GPUs are allocated ({', '.join(facts.gpus_allocated)}) but CUDA is not usable by {build}: the "
                        f"node's NVIDIA driver is older than this build needs (CUDA 13 needs driver >= 580) or no device "
                        f"is visible; use the training image that matches the driver (train/compat.yaml) instead of "
                        f"silently training on CPU.")
    if gpu and not arch_supported(facts.gpu_arch, facts.torch_cuda_archs):
        problems.append(f"{build} has no kernels for compute capability {facts.gpu_arch} (it has "
                        f"{' '.join(facts.torch_cuda_archs) or 'none'}): {_image_hint(facts.gpu_arch)}.")

    native_bf16 = gpu and parse_arch(facts.gpu_arch) >= NATIVE_BF16_MIN_ARCH
    precision = t.precision
    if precision == "auto":
        if gpu:
            precision = "bf16" if native_bf16 else "fp16"
        else:
            precision = "bf16" if facts.cpu_fast_bf16 else "fp32"
            if not facts.cpu_fast_bf16:
                notes.append("precision auto: this CPU has no AVX512-BF16/AMX, so fp32 (bf16 would be emulated, ~10x slower)")
    elif precision == "bf16" and gpu and not native_bf16:
        problems.append(f"train.precision=bf16 on compute capability {facts.gpu_arch} is emulated (bf16 tensor cores start "
                        f"at 8.0, Ampere); use precision auto or fp16.")
    elif precision == "bf16" and not gpu and not facts.cpu_fast_bf16:
        notes.append("train.precision=bf16 on a CPU without AVX512-BF16/AMX is emulated and much slower than fp32; "
                     "consider precision=auto")
    elif precision == "fp16" and not gpu and engine == "ddp":
        problems.append("train.precision=fp16 needs a CUDA GPU (GradScaler); use bf16 or fp32 on CPU.")

    backend = data_backend(cfg.data.backend, facts.dali_installed)
    if cfg.data.backend == "dali" and not facts.dali_installed:
        problems.append("data.backend=dali but NVIDIA DALI is not installed; install the 'dali' extra "
                        "(pip install -e '.[dali]') or set data.backend=torchvision.")
    if engine == "deepspeed":
        if not facts.deepspeed_installed:
            problems.append("engine=deepspeed but DeepSpeed is not installed; install the 'deepspeed' extra or use engine=ddp.")
        if cfg.model.unfreeze_after_epochs:
            problems.append("model.unfreeze_after_epochs is not supported with engine=deepspeed (ZeRO fixes the trainable "
                            "set at start); use engine=ddp.")
        if cfg.deepspeed.zero_stage >= 3:
            problems.append("deepspeed.zero_stage=3 is not supported: ZeRO-3 partitions the weights themselves, so the "
                            "checkpoints we export (best.pt) would hold empty tensors; use zero_stage 0, 1 or 2 "
                            "(SE-ResNet50's 28 M parameters fit any GPU).")
        if t.grad_compression != "none":
            problems.append("train.grad_compression is a DDP communication hook; with engine=deepspeed set it to none "
                            "(DeepSpeed already reduces mixed-precision gradients in their low-precision dtype).")
    if facts.rdma and facts.memlock_bytes != -1 and not facts.cap_ipc_lock:
        problems.append(rdma_memlock_problem(facts))
    if t.grad_compression == "bf16" and gpu and not native_bf16:
        problems.append(f"train.grad_compression=bf16 needs bf16 support (compute capability >= 8.0, have "
                        f"{facts.gpu_arch}); use fp16.")
    max_batch, memory = None, None
    if gpu and facts.gpu_memory_bytes:
        max_batch, memory = memory_plan(cfg, precision, backend, facts.gpu_memory_bytes)
        if cfg.data.batch_size > max_batch:
            notes.append(f"data.batch_size={cfg.data.batch_size} needs an estimated {memory['at_batch'] / 1024:.1f} GiB "
                         f"of this GPU's {facts.gpu_memory_bytes / 2**30:.1f} GiB ({precision}, "
                         f"{cfg.data.image_size} px, {backend}): it likely runs out of memory; use data.batch_size <= "
                         f"{max_batch} (the learning rate follows the global batch, optim.lr_scaling)")
    image = None
    if facts.gpu_arch:
        try:
            image = image_for_arch(facts.gpu_arch)[0]
        except KeyError:
            pass
    return Plan(device=device, precision=precision, data_backend=backend, channels_last=t.channels_last != "off",
                grad_scaler=precision == "fp16", gpu_arch=facts.gpu_arch if gpu else None,
                torch_version=facts.torch_version, torch_cuda_archs=list(facts.torch_cuda_archs), image=image,
                max_batch_per_gpu=max_batch, memory_mib=memory, problems=problems, notes=notes)


def rdma_memlock_problem(facts: Facts) -> str:
    """NCCL's InfiniBand transport pins (registers) its buffers: without CAP_IPC_LOCK the memlock limit caps that, and
    capabilities.add: [IPC_LOCK] never reaches the effective set of a non-root uid (kubernetes#56374)."""
    kib = facts.memlock_bytes // 1024
    return (f"NCCL is set to use RDMA/InfiniBand ({facts.rdma}) but this process (uid {os.getuid()}) may lock only "
            f"{kib} KiB of memory (ulimit -l {kib}) and has no effective CAP_IPC_LOCK, so NCCL cannot register its "
            f"buffers: make the container runtime's memlock limit unlimited (containerd or CRI-O: LimitMEMLOCK=infinity "
            f"in its systemd unit; Docker: --default-ulimit memlock=-1:-1), or run the container as uid 0 (IPC_LOCK in "
            f"securityContext.capabilities.add is not effective for a non-root uid, kubernetes#56374), or set "
            f"NCCL_IB_DISABLE=1 to train over sockets.")
