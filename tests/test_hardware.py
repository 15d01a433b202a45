"""The hardware rule book fed with facts (V100, T4, A100, H100, Blackwell, no GPU, GPUs allocated but CUDA unusable),
and `python -m launch preflight` running the same code against this venv's real torch build."""
import json
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
