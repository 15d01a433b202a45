"""DeepSpeed fp16 (torch_autocast + GradScaler) at ZeRO 0, 1 and 2: an overflowing step is skipped and the loss scale
falls (an inf gradient injected through the real DeepSpeed engine, CPU accelerator, gloo); the ZeRO gradient buckets
are sized for SE-ResNet50, overridable through deepspeed.extra.zero_optimization."""
import json
import subprocess

import pytest

from tests.conftest import PY, ROOT, free_port, require, subprocess_env
from train.backends import ZERO_BUCKETS
from train.config import ConfigError, load_config

PROBE = ROOT / "tests" / "ds_fp16_probe.py"


@pytest.fixture(scope="module")
def probe():
    require("deepspeed")
    # fp32 first: DeepSpeed's torch_autocast state is process-wide once an fp16 engine has set it up
    cases = ["2:fp32", "1:fp32:2000000", "0:fp16", "1:fp16", "2:fp16"]
    env = subprocess_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(free_port()))
    r = subprocess.run([PY, str(PROBE), *cases], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = [json.loads(line[7:]) for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    return {x["case"]: x for x in results}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["0", "1", "2"])
def test_fp16_at_every_zero_stage_skips_the_overflowing_step_and_lowers_the_loss_scale(probe, stage):
    """V100's default (precision auto is fp16): an inf gradient skips the step and halves the scale, as GradScaler
    does, at every ZeRO stage the plan lets start; else every later step would be skipped as well."""
    r = probe[f"{stage}:fp16"]
    assert r["problems"] == [], r
    assert r["skipped"], f"ZeRO-{stage} fp16: the overflowing step changed the weights"
    assert r["scale_after"] == r["scale_before"] / 2, f"ZeRO-{stage} fp16: loss scale {r['scale_before']} -> {r['scale_after']}"


@pytest.mark.slow
def test_zero_buckets_are_sized_for_the_model_and_overridable(probe):
    assert probe["2:fp32"]["reduce_bucket_size"] == ZERO_BUCKETS["reduce_bucket_size"] == 5_000_000
    assert probe["2:fp32"]["allgather_bucket_size"] == ZERO_BUCKETS["allgather_bucket_size"] == 5_000_000
    assert probe["1:fp32:2000000"]["reduce_bucket_size"] == 2_000_000
    assert probe["1:fp32:2000000"]["allgather_bucket_size"] == 5_000_000


def test_deepspeed_extra_accepts_only_the_bucket_keys_of_zero_optimization():
    cfg = load_config(None, ["deepspeed.extra={zero_optimization: {reduce_bucket_size: 2000000, allgather_bucket_size: 3e6}}"])
    assert cfg.deepspeed.extra["zero_optimization"] == {"reduce_bucket_size": 2_000_000, "allgather_bucket_size": 3_000_000}
    with pytest.raises(ConfigError, match=r"may set only reduce_bucket_size, allgather_bucket_size \(got stage\); "
                                          r"the stage is deepspeed.zero_stage"):
        load_config(None, ["deepspeed.extra={zero_optimization: {stage: 2}}"])
    with pytest.raises(ConfigError, match=r"zero_optimization.reduce_bucket_size must be a whole number of elements"):
        load_config(None, ["deepspeed.extra={zero_optimization: {reduce_bucket_size: 0}}"])
