"""Real torchrun runs: DDP (gloo) over 2 ranks, DeepSpeed ZeRO-1/2 bf16, metrics scraped live, SIGKILL + resume."""
import json
import math
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.conftest import PY, ROOT, SMOKE_CONFIG, free_port_pair, kill_tree, subprocess_env

pytestmark = pytest.mark.slow
PROBE = ROOT / "tests" / "dist_probe.py"


def torchrun_cmd(nproc: int, out: Path, data: Path, *overrides: str, script=PROBE) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(script),
            str(SMOKE_CONFIG), f"data.root={data}", f"output_dir={out}", *overrides]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def ddp_run(tiny_imagefolder, tmp_path_factory):
    """2-rank DDP, 2 epochs (12 steps); scrapes both ranks' Prometheus endpoints while it trains."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    port = free_port_pair()   # rank r serves metrics on metrics.port + r: both must be free
    proc = subprocess.Popen(torchrun_cmd(2, out, tiny_imagefolder, "train.epochs=2", "train.record_samples=true",
                                         f"metrics.port={port}", "train.checkpoint_every_steps=4"),
                            env=subprocess_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        scraped = {}
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and len(scraped) < 2:
            for rank, p in ((0, port), (1, port + 1)):
                try:
                    text = scrape(p)
                except OSError:
                    continue
                if 'seresnet_train_steps_total{rank="%d"}' % rank in text and "seresnet_train_loss{" in text:
                    scraped[rank] = text
            time.sleep(0.5)
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:   # a failed fixture leaves no torchrun group (or its ports) behind
            kill_tree(proc, group=True)
    assert proc.returncode == 0, log[-4000:]
    return out, scraped, log


def test_ddp_ranks_end_identical_and_saw_disjoint_samples(ddp_run):
    out, _, log = ddp_run
    p0 = torch.load(out / "params-rank0.pt", weights_only=True)
    p1 = torch.load(out / "params-rank1.pt", weights_only=True)
    assert p0.keys() == p1.keys()
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k
    rows = {r: (out / "samples" / f"rank{r}.txt").read_text().split("\n")[:-1] for r in (0, 1)}
    assert len(rows[0]) == len(rows[1]) == 12
    for step in range(12):
        a, b = set(rows[0][step].split()), set(rows[1][step].split())
        assert len(a) == len(b) == 4 and not a & b
    epoch1 = {i for r in (0, 1) for line in rows[r][:6] for i in line.split()}
    assert len(epoch1) == 48, "one epoch covers the whole training split once"


def test_ddp_writes_report_checkpoints_and_progress(ddp_run):
    out, _, log = ddp_run
    report = json.loads((out / "report.json").read_text())
    confusion = report["test_confusion"]   # the top-1 is the confusion matrix's diagonal over the 18 test images
    assert report["test_images"] == 18
    assert report["test_top1"] == pytest.approx(sum(confusion[i][i] for i in range(len(confusion))) / 18, abs=1e-5)
    assert set(report["test_recall"]) == {"circle", "square", "triangle"}
    assert sum(map(sum, report["test_confusion"])) == 18
    assert report["world_size"] == 2 and report["engine"] == "ddp"
    assert (out / "confusion_test.png").stat().st_size > 1000
    ck = out / "checkpoints"
    assert (ck / "last.pt").exists() and (ck / "best.pt").exists() and (ck / "last.pt.sha256").exists()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in x and "lr" in x and "images_per_second" in x for x in lines)
    assert "epoch 2/2" in log and "img/s=" in log
    assert (out / "config.yaml").exists()


def test_training_metrics_scraped_from_both_ranks(ddp_run):
    _, scraped, _ = ddp_run
    assert set(scraped) == {0, 1}, "both ranks must expose metrics during the run"
    for rank, text in scraped.items():
        for name in ("seresnet_train_images_per_second", "seresnet_train_step_seconds_bucket",
                     "seresnet_train_data_wait_seconds_count", "seresnet_train_loss", "seresnet_train_learning_rate",
                     "seresnet_train_epoch", "seresnet_train_device_memory_bytes", "seresnet_train_images_total"):
            assert f'{name}{{' in text and f'rank="{rank}"' in text, (rank, name)


def test_sigkill_then_rerun_resumes_to_the_same_weights(ddp_run, tiny_imagefolder, tmp_path):
    """As a user runs it: `python -m launch local --nproc 2` (python -m train's run lock, parent-death signal and error
    handling included); the launcher's process group and both workers are SIGKILLed right after the step-4
    checkpoint, and the same command, rerun at once on the same metrics ports, resumes at step 4 and ends with the
    weights of the uninterrupted run."""
    ref_out, _, _ = ddp_run
    out = tmp_path / "run"
    port = free_port_pair()
    cmd = [PY, "-m", "launch", "local", "--nproc", "2", "--", "--config", str(SMOKE_CONFIG),
           "--set", f"data.root={tiny_imagefolder}", "--set", f"output_dir={out}", "--set", "train.epochs=2",
           "--set", "train.checkpoint_every_steps=4", "--set", f"metrics.port={port}"]
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as f:
        proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    marker = out / "checkpoints" / "step-00000004.pt"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not marker.exists() and proc.poll() is None:
            time.sleep(0.05)
        assert marker.exists(), first_log.read_text()[-3000:]
    finally:
        kill_tree(proc, group=True)   # also when the marker never appears: no group left running
    assert not (out / "report.json").exists(), "killed before finishing"
    r = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    text = r.stdout + r.stderr
    resumed = [line for line in text.splitlines() if "resuming from" in line]
    assert resumed and "step 4 of 12" in resumed[0], resumed or text[-3000:]
    assert "recovered a stale lock" in text, text[-3000:]
    a = torch.load(ref_out / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 12
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)


COMBOS = ["0-sgd", "1-sgd", "2-sgd", "0-adamw", "1-adamw", "2-adamw"]
DS_SETS = ["engine=deepspeed", "optim.lr=0.01", "train.precision=bf16", "metrics.port=0", "train.record_samples=true",
           "train.checkpoint_every_steps=0", "train.channels_last=on"]


@pytest.fixture(scope="module")
def ds_matrix(tiny_imagefolder, tmp_path_factory):
    """Every optimizer the config offers under every ZeRO stage we offer, in one torchrun group (SGD needs
    zero_allow_untested_optimizer at ZeRO >= 1); bf16 through DeepSpeed's torch_autocast."""
    base = tmp_path_factory.mktemp("dsmatrix")
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(ROOT / "tests" / "ds_matrix_probe.py"),
           str(SMOKE_CONFIG), str(base), ",".join(COMBOS), f"data.root={tiny_imagefolder}", "train.max_steps=3", *DS_SETS]
    r = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return base


@pytest.mark.parametrize("combo", COMBOS)
def test_deepspeed_every_zero_stage_with_every_optimizer(ds_matrix, combo):
    """Parameters and BatchNorm statistics stay fp32, ranks agree, shards are disjoint, best.pt holds full weights."""
    out = ds_matrix / combo
    p0 = torch.load(out / "params-rank0.pt", weights_only=True)
    p1 = torch.load(out / "params-rank1.pt", weights_only=True)
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k
        if p0[k].is_floating_point():
            assert p0[k].dtype == torch.float32, f"{k} is {p0[k].dtype}: DeepSpeed must not cast weights/BN buffers"
    assert float(p0["bn1.running_var"].sub(1).abs().max()) > 0, "BatchNorm statistics were updated"
    rows = [(out / "samples" / f"rank{i}.txt").read_text().split("\n")[0].split() for i in (0, 1)]
    assert not set(rows[0]) & set(rows[1])
    report = json.loads((out / "report.json").read_text())
    assert report["engine"] == "deepspeed" and report["precision"] == "bf16" and report["world_size"] == 2
    assert report["steps"] == 3 and math.isfinite(report["final_lr"])
    assert (out / "checkpoints" / "deepspeed" / "latest").exists()
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    from train.config import load_config
    from train.models import create_model
    model = create_model(load_config(SMOKE_CONFIG).model, 3)
    model.load_state_dict(best["model"])   # full weights (ZeRO 1/2 partition optimizer state, not weights): exportable
    for k, v in best["model"].items():
        torch.testing.assert_close(v, p0[k], msg=k)


def test_deepspeed_sgd_zero2_resumes_through_its_own_checkpoint(ds_matrix, tiny_imagefolder):
    """DeepSpeed's checkpoint (loaded with our weights-only loader) resumes the SGD/ZeRO-2 run and trains on."""
    out = ds_matrix / "2-sgd"
    r = subprocess.run(torchrun_cmd(2, out, tiny_imagefolder, "deepspeed.zero_stage=2", "optim.name=sgd",
                                    "train.max_steps=5", *DS_SETS), env=subprocess_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resuming from" in r.stderr and "step 3 of 5" in r.stderr, r.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["steps"] == 5


def test_zero_stage_3_is_refused_in_one_sentence(tiny_imagefolder, tmp_path):
    r = subprocess.run([PY, "-m", "train", "--config", str(SMOKE_CONFIG), "--set", f"data.root={tiny_imagefolder}",
                        "--set", f"output_dir={tmp_path / 'z3'}", "--set", "engine=deepspeed",
                        "--set", "deepspeed.zero_stage=3"], env=subprocess_env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "deepspeed.zero_stage=3 is not supported" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_ddp_gradient_compression_hook_trains(tiny_imagefolder, tmp_path):
    """train.grad_compression=fp16 registers DDP's fp16 all-reduce hook (default_hooks.fp16_compress_hook): ranks stay
    identical and the loss is finite."""
    out = tmp_path / "fp16hook"
    r = subprocess.run(torchrun_cmd(2, out, tiny_imagefolder, "train.grad_compression=fp16", "train.max_steps=3",
                                    "metrics.port=0", "train.checkpoint_every_steps=0"),
                       env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    p0 = torch.load(out / "params-rank0.pt", weights_only=True)
    p1 = torch.load(out / "params-rank1.pt", weights_only=True)
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert lines and all(math.isfinite(x["loss"]) for x in lines)
