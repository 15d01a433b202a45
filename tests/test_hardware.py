"""The hardware rule book fed with facts (V100, T4, A100, H100, Blackwell, no GPU, GPUs allocated but CUDA unusable),
and `python -m launch preflight` running the same code against this venv's real torch build."""
import json
import os
import subprocess

import pytest
import torch

from tests.conftest import PY, ROOT, subprocess_env
from train.compat import image_for_arch, load_table
from train.config import load_config
from train.hardware import Facts, arch_supported, decide, described_facts, local_facts

CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]      # torch 2.14.1+cu130 (this venv)
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]  # torch 2.14.1+cu126 (the Volta image)


def gpu(arch: str, archs=CU130, **kw) -> Facts:
    return Facts(gpu_arch=arch, gpu_count=8, gpus_allocated=["nvidia.com/gpu=8"], cuda_usable=True,
                 torch_cuda_archs=archs, dali_installed=True, deepspeed_installed=True, **kw)


@pytest.fixture
def cfg():
    return load_config(ROOT / "configs" / "imagenet.yaml")


@pytest.mark.parametrize("arch,precision,image", [("7.5", "fp16", "ampere_plus"), ("8.0", "bf16", "ampere_plus"),
                                                  ("8.6", "bf16", "ampere_plus"), ("8.9", "bf16", "ampere_plus"),
                                                  ("9.0", "bf16", "ampere_plus"), ("10.0", "bf16", "ampere_plus"),
                                                  ("12.0", "bf16", "ampere_plus")])
def test_auto_precision_is_native_only(cfg, arch, precision, image):
    plan = decide(cfg, gpu(arch))
    assert (plan.device, plan.precision, plan.image, plan.problems) == ("cuda", precision, image, [])
    assert plan.grad_scaler == (precision == "fp16")


def test_v100_on_the_cu130_build_is_refused_naming_the_volta_image(cfg):
    plan = decide(cfg, gpu("7.0"))
    assert plan.precision == "fp16", "V100 has no native bf16: fp16 + GradScaler, never emulated bf16"
    assert len(plan.problems) == 1 and "compute capability 7.0" in plan.problems[0]
    assert "volta" in plan.problems[0] and "train-volta.Dockerfile" in plan.problems[0]


def test_v100_on_the_cu126_build_runs_fp16(cfg):
    plan = decide(cfg, gpu("7.0", archs=CU126))
    assert plan.problems == [] and plan.precision == "fp16" and plan.image == "volta"


def test_bf16_forced_on_volta_or_turing_is_a_problem(cfg):
    cfg.train.precision = "bf16"
    for arch, archs in (("7.0", CU126), ("7.5", CU130)):
        problems = decide(cfg, gpu(arch, archs=archs)).problems
        assert any("emulated" in p for p in problems), (arch, problems)


def test_gpus_allocated_but_cuda_unusable_refuses_instead_of_training_on_cpu(cfg):
    facts = Facts(gpus_allocated=["CUDA_VISIBLE_DEVICES=0,1"], cuda_usable=False, torch_cuda_archs=CU130,
                  dali_installed=True, deepspeed_installed=True)
    plan = decide(cfg, facts)
    assert plan.device == "cpu" and any("CUDA is not usable" in p and "580" in p for p in plan.problems)


def test_no_gpu_cpu_precision_follows_the_cpu(cfg):
    base = dict(torch_cuda_archs=CU130, dali_installed=True, deepspeed_installed=True)
    assert decide(cfg, Facts(cpu_fast_bf16=True, **base)).precision == "bf16"
    slow = decide(cfg, Facts(cpu_fast_bf16=False, **base))
    assert slow.precision == "fp32" and slow.problems == [] and slow.notes


def test_engine_specific_problems(cfg):
    cfg.engine = "deepspeed"
    cfg.deepspeed.zero_stage = 3
    assert any("zero_stage=3" in p for p in decide(cfg, gpu("9.0")).problems)
    cfg.deepspeed.zero_stage = 2
    assert decide(cfg, gpu("9.0")).problems == []
    missing = Facts(gpu_arch="9.0", cuda_usable=True, torch_cuda_archs=CU130, dali_installed=False,
                    deepspeed_installed=False)
    problems = decide(cfg, missing).problems
    assert any("DeepSpeed is not installed" in p for p in problems) and any("DALI is not installed" in p for p in problems)


def test_arch_rule_is_torchs_own():
    assert arch_supported("8.9", CU130) and arch_supported("9.0", CU130) and arch_supported("12.0", CU130)
    assert not arch_supported("7.0", CU130) and arch_supported("7.0", CU126)
    assert not arch_supported("6.1", CU130)


def test_compat_table_rows_cover_their_archs():
    for name, row in load_table()["train_images"].items():
        for arch in row["archs"]:
            assert image_for_arch(arch)[0] == name


def test_local_facts_match_this_torch():
    f = local_facts()
    assert f.torch_cuda_archs == torch.cuda.get_arch_list() and f.cuda_usable == torch.cuda.is_available()


def preflight(*args):
    return subprocess.run([PY, "-m", "launch", "preflight", *args], env=subprocess_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_preflight_cli_v100_and_h100():
    v100 = preflight("--config", "configs/imagenet.yaml", "--gpu-arch", "7.0", "--json")
    assert v100.returncode == 1, v100.stderr
    out = json.loads(v100.stdout)
    assert out["precision"] == "fp16" and out["torch_cuda_archs"] == torch.cuda.get_arch_list()
    assert any("volta" in p for p in out["problems"])
    h100 = preflight("--config", "configs/imagenet.yaml", "--gpu-arch", "9.0", "--json", "--nnodes", "2",
                     "--nproc-per-node", "8")
    assert h100.returncode == 0, h100.stdout + h100.stderr
    out = json.loads(h100.stdout)
    assert out["precision"] == "bf16" and out["problems"] == [] and out["world_size"] == 16
    assert out["data_backend"] in ("dali", "torchvision")


def test_preflight_local_checks_paths_and_reads_like_the_engine(tmp_path):
    r = preflight("--config", "configs/demo.yaml", "--set", f"data.root={tmp_path / 'nowhere'}")
    assert r.returncode == 1 and "has no train/ folder" in r.stdout
    same = decide(load_config(ROOT / "configs" / "demo.yaml"), local_facts())
    r = preflight("--config", "configs/demo.yaml", "--set", f"data.root={tmp_path / 'nowhere'}", "--json")
    assert json.loads(r.stdout)["precision"] == same.precision


def test_preflight_bad_arch_is_one_sentence():
    r = preflight("--config", "configs/demo.yaml", "--gpu-arch", "volta")
    assert r.returncode == 2 and "not a compute capability" in r.stderr and "Traceback" not in r.stderr


def test_described_facts_use_this_build():
    assert described_facts("9.0").torch_cuda_archs == torch.cuda.get_arch_list()


# --- GPU memory: the batch per GPU sized in the plan (a 16 GB V100 vs an 80 GB H100), DALI's nvJPEG buffers

def test_batch_is_sized_per_gpu_memory_v100_16gb_vs_h100_80gb(cfg):
    assert cfg.data.batch_size == 256
    v100 = decide(cfg, gpu("7.0", CU126, gpu_memory_bytes=16 * 2**30))
    h100 = decide(cfg, gpu("9.0", gpu_memory_bytes=80 * 2**30))
    assert (v100.precision, h100.precision) == ("fp16", "bf16")
    assert 64 <= v100.max_batch_per_gpu < 256 <= h100.max_batch_per_gpu, (v100.memory_mib, h100.memory_mib)
    note = [n for n in v100.notes if n.startswith("data.batch_size=256 needs an estimated")]
    assert len(note) == 1 and f"use data.batch_size <= {v100.max_batch_per_gpu}" in note[0], v100.notes
    assert not [n for n in h100.notes if "data.batch_size" in n], h100.notes
    fits = decide(load_config(ROOT / "configs" / "imagenet.yaml", [f"data.batch_size={v100.max_batch_per_gpu}"]),
                  gpu("7.0", CU126, gpu_memory_bytes=16 * 2**30))
    assert not [n for n in fits.notes if "data.batch_size" in n] and fits.memory_mib["at_batch"] <= 16 * 1024
    assert decide(cfg, gpu("9.0")).max_batch_per_gpu is None   # memory unknown: no guess


def test_preflight_prints_the_batch_that_fits():
    r = preflight("--config", "configs/imagenet.yaml", "--gpu-arch", "7.0", "--gpu-memory-gb", "16")
    line = [x for x in r.stdout.splitlines() if x.startswith("GPU memory:")]
    assert line and "batch 256 per GPU needs ~" in line[0] and "estimated to fit up to" in line[0], r.stdout


def test_dali_nvjpeg_padding_is_split_over_threads_and_eval_keeps_the_defaults():
    """The decoders DALI is given ('mixed' decode, graph only: no GPU needed to build it)."""
    dali = pytest.importorskip("nvidia.dali")   # noqa: F841
    from train.config import DataConfig
    from train.dali import (DALI_DEVICE_PADDING, DEVICE_PADDING_BUDGET, HOST_PADDING_BUDGET, _Source,
                            build_eval_pipeline, build_train_pipeline)

    def decoder_args(pipe) -> str:
        pipe._build_graph()   # nvidia/dali/pipeline.py: the operator specs, before any backend (CUDA) is touched
        return next(str(op.spec) for op in pipe._ops if "nvidia.dali.fn.decoders" in str(op.spec))

    for threads in (1, 8, 32):
        data = DataConfig(batch_size=4, workers=threads, backend="dali")
        train = decoder_args(build_train_pipeline(data, _Source([], 4, 1), 0, torch.device("cuda", 0)))
        device = max(DALI_DEVICE_PADDING, DEVICE_PADDING_BUDGET // threads)
        assert f"device_memory_padding: {device}\n" in train and device * threads <= max(DEVICE_PADDING_BUDGET, DALI_DEVICE_PADDING * threads)
        assert f"host_memory_padding: {max(8 << 20, HOST_PADDING_BUDGET // threads)}\n" in train
        evaluation = decoder_args(build_eval_pipeline(data, _Source([], 4, 1), torch.device("cuda", 0)))
        assert "memory_padding" not in evaluation, evaluation


# --- RDMA at job start: the locked-memory limit and CAP_IPC_LOCK of the process itself

@pytest.mark.parametrize("memlock,cap,refused", [(64 << 10, False, True), (-1, False, False), (64 << 10, True, False)])
def test_rdma_needs_unlimited_memlock_or_cap_ipc_lock(cfg, memlock, cap, refused):
    plan = decide(cfg, gpu("9.0", rdma="NCCL_IB_HCA=mlx5_0", memlock_bytes=memlock, cap_ipc_lock=cap))
    found = [p for p in plan.problems if p.startswith("NCCL is set to use RDMA/InfiniBand (NCCL_IB_HCA=mlx5_0)")]
    assert bool(found) == refused, plan.problems
    if refused:
        assert "ulimit -l 64" in found[0] and "kubernetes#56374" in found[0] and "LimitMEMLOCK=infinity" in found[0]
    assert not decide(cfg, gpu("9.0", memlock_bytes=64 << 10)).problems   # no RDMA configured: nothing to check


def test_preflight_in_the_pod_reads_ulimit_and_capeff():
    """A real process with `ulimit -l 64` and no CAP_IPC_LOCK (as root: dropped from the bounding set, as a pod's
    non-root uid never has it) and NCCL_IB_HCA set: preflight refuses; with NCCL_IB_DISABLE=1 it does not."""
    if os.geteuid() == 0:
        drop = ["setpriv", "--bounding-set=-ipc_lock"]
    else:
        drop = []
    cmd = ["prlimit", f"--memlock={64 << 10}", *drop, PY, "-m", "launch", "preflight", "--config", "configs/demo.yaml",
           "--json"]
    r = subprocess.run(cmd, env=subprocess_env(NCCL_IB_HCA="mlx5_0"), cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = json.loads(r.stdout)
    assert out["rdma"] == {"configured": "NCCL_IB_HCA=mlx5_0", "memlock_bytes": 64 << 10, "cap_ipc_lock": False}, out
    assert r.returncode == 1 and any(p.startswith("NCCL is set to use RDMA/InfiniBand") for p in out["problems"])
    r = subprocess.run(cmd, env=subprocess_env(NCCL_IB_HCA="mlx5_0", NCCL_IB_DISABLE="1"), cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert json.loads(r.stdout)["rdma"] is None
