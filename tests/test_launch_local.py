"""`python -m launch local --nproc 2` really trains, with DDP and with DeepSpeed (under torchrun, on CPU/gloo).

DeepSpeed's first distributed start compiles deepspeed_shm_comm (~80 s) into TORCH_EXTENSIONS_DIR
(<repo>/.cache/torch_extensions, exported by the Makefile and defaulted by the launcher); later runs reuse it.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SMOKE_CONFIG, subprocess_env

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_launch_local_two_processes_trains(engine, tmp_path, tiny_imagefolder):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch", "local", "--nproc", "2", "--engine", engine, "--",
           "--config", str(SMOKE_CONFIG), "--set", f"data.root={tiny_imagefolder}", "--set", f"output_dir={out}",
           "--set", "train.max_steps=4"]
    r = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=840)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    # The launcher echoes the torchrun command it exec'd; the trainer ran 2 ranks with the asked-for engine.
    assert "-m torch.distributed.run --standalone --nnodes=1 --nproc-per-node=2 -m train" in log
    report = json.loads((out / "report.json").read_text())
    assert report["engine"] == engine and report["world_size"] == 2, report
    confusion = report["test_confusion"]   # the top-1 is the confusion matrix's diagonal over the 18 test images
    assert sum(map(sum, confusion)) == report["test_images"] == 18 and report["steps"] == 4
    assert report["test_top1"] == pytest.approx(sum(confusion[i][i] for i in range(len(confusion))) / 18, abs=1e-5)
    resolved = (out / "config.yaml").read_text()
    assert f"engine: {engine}" in resolved
