"""`serve up` stops the server when one of its python stubs dies: Triton does not restart the stub and the model
fails every request from then on while the local server's /v2/health/ready stays 200, so `serve up` exits 3 with one
sentence naming the model, leaving no server process behind, for whatever supervises it to start it again."""
from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from launch.torchrun import REPO_ROOT
from serve.export import export_onnx
from serve.repository import write_model_repository
from tests.conftest import kill_tree, subprocess_env
from tests.serve_fixtures import make_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def test_serve_up_exits_when_a_python_stub_dies_and_leaves_no_server(tmp_path):
    export_onnx(make_checkpoint(tmp_path / "ckpt"), tmp_path / "export")
    repo = write_model_repository(tmp_path / "export", tmp_path / "repo", "cpu")
    up = subprocess.Popen([sys.executable, "-m", "serve", "up", "--repository", str(repo), "--http-port", "0",
                           "--grpc-port", "0", "--metrics-port", "0"], cwd=REPO_ROOT, env=subprocess_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs: list[psutil.Process] = []
    try:
        for line in up.stdout:
            if line.startswith("[serve] ready:"):
                break
        assert up.poll() is None, up.stderr.read()[-2000:]
        procs = psutil.Process(up.pid).children(recursive=True)
        stubs = [p for p in procs if p.name().startswith("triton_python")]
        victim = next(p for p in stubs if "/preprocess/" in " ".join(p.cmdline()))
        assert "python stubs" in line and str(len(stubs)) in line, line
        time.sleep(3)
        assert up.poll() is None, "serve up runs on while its stubs run"
        t0 = time.monotonic()
        victim.kill()
        rc = up.wait(60)
        took = time.monotonic() - t0
        err = up.stderr.read()
    finally:
        kill_tree(up)
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    assert rc == 3, (rc, err[-2000:])
    lines = [l for l in err.splitlines() if l.startswith("[serve] error:")]
    assert len(lines) == 1 and "python stub of 'preprocess'" in lines[0] and "does not restart it" in lines[0], err[-2000:]
    gone, alive = psutil.wait_procs(procs, timeout=90)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [(p.pid, p.name()) for p in alive]
    assert took < 45, took
    print(f"\nRELIABILITY serve up with a dead stub: exited 3 after {took:.1f} s, {len(procs)} server processes gone")
