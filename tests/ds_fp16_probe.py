"""Run by tests/test_deepspeed_fp16.py as one process (RANK/WORLD_SIZE/MASTER_* set, gloo, DeepSpeed's CPU
accelerator). For each case "stage:precision[:reduce_bucket_size]" it asks the hardware plan (train.hardware.decide,
on the facts of a V100 whose torch build has sm_70 kernels) whether the job may start; when it may, it builds the real
DeepSpeedBackend, trains one good step, then one step with an inf gradient injected into one weight, and prints one
JSON line per case: whether that step was skipped (weights unchanged) and the loss scale before and after it."""
import json
import sys

import torch
from torch import nn

from train.backends import DeepSpeedBackend
from train.config import load_config
from train.distributed import setup_distributed
from train.hardware import Facts, decide

V100 = Facts(gpu_arch="7.0", gpu_count=1, gpus_allocated=["nvidia.com/gpu=1"], cuda_usable=True,
             torch_cuda_archs=["sm_70"], deepspeed_installed=True, described=True)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))


def grad_scaler(engine):
    """The GradScaler DeepSpeed runs for torch_autocast fp16: the engine's own at ZeRO 0 (runtime/engine.py
    torch_autocast_z0_gradscaler), the ZeRO optimizer's at stage 1/2 (runtime/zero/stage_1_and_2.py)."""
    return engine.torch_autocast_z0_gradscaler or getattr(engine.optimizer, "torch_autocast_gradscaler", None)


def run(case: str, dinfo) -> dict:
    stage, precision, *bucket = case.split(":")
    sets = ["engine=deepspeed", f"deepspeed.zero_stage={stage}", f"train.precision={precision}"]
    if bucket:
        sets.append(f"deepspeed.extra={{zero_optimization: {{reduce_bucket_size: {bucket[0]}}}}}")
    cfg = load_config(None, sets + ["data.batch_size=4"])
    plan = decide(cfg, V100)
    out = {"case": case, "problems": plan.problems}
    if plan.problems:
        return out
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    backend = DeepSpeedBackend(cfg, model, opt, dinfo, precision)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    backend.step(nn.functional.cross_entropy(backend.forward(x).float(), y))   # one good step
    scaler = grad_scaler(backend.engine)
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    scale_before = float(scaler.get_scale()) if scaler else None
    hook = model[5].weight.register_hook(lambda g: torch.full_like(g, float("inf")))   # the injected overflow
    backend.step(nn.functional.cross_entropy(backend.forward(x).float(), y))
    hook.remove()
    params = [k for k, _ in model.named_parameters()]
    out.update(skipped=all(torch.equal(before[k], model.state_dict()[k]) for k in params),
               scale_before=scale_before, scale_after=float(scaler.get_scale()) if scaler else None,
               reduce_bucket_size=getattr(backend.engine.optimizer, "reduce_bucket_size", None),
               allgather_bucket_size=getattr(backend.engine.optimizer, "allgather_bucket_size", None))
    return out


if __name__ == "__main__":
    dinfo = setup_distributed("cpu", "deepspeed")
    for case in sys.argv[1:]:
        print("RESULT " + json.dumps(run(case, dinfo)), flush=True)
