"""One writer or any number of servers per model repository folder (serve/repository_lock.py): a second `serve
repository` on one folder is refused, a served repository is not rewritten (also after the server's launcher was
SIGKILLed: the server itself holds the lock), and `serve up` does not start on a repository being written. Each
refusal is one sentence naming the holder, and the folder is left as it was."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch.torchrun import REPO_ROOT
from serve.export import export_onnx
from tests.conftest import kill_tree, lock_holder, subprocess_env
from tests.serve_fixtures import make_checkpoint

HOLD = ("import sys, time\nfrom serve.repository_lock import writing\n"
        "with writing(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    d = tmp_path_factory.mktemp("lock-export")
    export_onnx(make_checkpoint(d / "ckpt"), d / "export")
    return d / "export"


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve", *args], cwd=REPO_ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def _write(export: Path, out: Path) -> subprocess.CompletedProcess:
    return _cli("repository", "--export", str(export), "--out", str(out))


def _tree(folder: Path) -> dict[str, str]:
    """Every file's hash, but the byte code the python stubs cache beside their sources."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def _one_sentence(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2 and r.stderr.count("\n") == 1, (r.returncode, r.stderr[-2000:])
    for w in words:
        assert w in r.stderr, r.stderr


def _holder(out: Path) -> subprocess.Popen:
    """Another writer, caught while it writes: a real process holding the writer's lock on ``out``."""
    return lock_holder(HOLD, str(out))


def test_a_second_writer_is_refused_and_a_server_waits_for_the_writer(export, tmp_path):
    out = tmp_path / "repo"
    holder = _holder(out)
    try:
        r = _write(export, out)
        _one_sentence(r, "is being written by another 'serve repository'", f"pid {holder.pid}")
        assert not any(out.iterdir()), "the refused writer wrote nothing"
    finally:
        kill_tree(holder)
    assert _write(export, out).returncode == 0
    before = _tree(out)
    holder = _holder(out)
    try:
        r = _write(export, out)
        _one_sentence(r, "is being written by another 'serve repository'")
        r = _cli("up", "--repository", str(out), "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", timeout=60)
        _one_sentence(r, "is being written by 'serve repository'", "start the server when it has finished")
    finally:
        kill_tree(holder)
    assert _tree(out) == before, "refused writers and servers change nothing"


def test_a_refused_writer_removes_the_folder_it_created(export, tmp_path):
    r = _cli("repository", "--export", str(export), "--out", str(tmp_path / "new"), "--version-policy", "specific:2")
    assert r.returncode == 2 and "does not serve version 1" in r.stderr, r.stderr
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_a_served_repository_is_not_rewritten_even_after_its_launcher_is_killed(export, tmp_path):
    out = tmp_path / "repo"
    assert _write(export, out).returncode == 0
    before = _tree(out)
    launcher = subprocess.Popen([sys.executable, "-m", "serve", "up", "--repository", str(out), "--http-port", "0",
                                 "--grpc-port", "0", "--metrics-port", "0"], cwd=REPO_ROOT, env=subprocess_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        for line in launcher.stdout:
            if line.startswith("[serve] ready:") or time.monotonic() > deadline:
                break
        assert launcher.poll() is None, "serve up exited before it was ready"
        server = psutil.Process(launcher.pid).children(recursive=True)
        assert any(p.name() == "tritonserver" for p in server), [p.name() for p in server]
        r = _write(export, out)
        _one_sentence(r, "is served by a running tritonserver", "stop the server first")
        launcher.send_signal(signal.SIGKILL)   # the launcher only: its tritonserver runs on in its own session
        launcher.wait(30)
        assert all(p.is_running() for p in server if p.name() == "tritonserver")
        r = _write(export, out)
        _one_sentence(r, "is served by a running tritonserver")
        assert _tree(out) == before
    finally:
        kill_tree(launcher)
        for p in server:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        psutil.wait_procs(server, timeout=60)
    deadline = time.monotonic() + 60   # the lock goes with the server's last process
    while (r := _write(export, out)).returncode != 0 and time.monotonic() < deadline:
        time.sleep(2)
    assert r.returncode == 0, r.stderr
