"""One run per output folder and no orphaned workers, with real processes: the ``<output_dir>/.lock`` (refusal naming
the holder, stale-lock recovery, other ranks), and the parent-death signal (a ``kill -9`` of the process group that
``python -m launch local`` started leaves no worker behind, and the same command rerun at once resumes)."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from scripts import prepare_animals
from tests.conftest import PY, ROOT, SMOKE_CONFIG, free_port, lock_holder, subprocess_env
from train.runlock import LOCK_NAME, RunLock, RunLockError

HOLD = ("import sys, time; from train.runlock import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); "
        "print('held', flush=True); {after}")


def _holder(out: Path, after: str = "time.sleep(600)") -> subprocess.Popen:
    """A real process holding the lock on ``out`` (it prints 'held' once it does)."""
    return lock_holder(HOLD.format(after=after), str(out))


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_a_second_run_on_the_same_folder_is_refused_naming_the_holder(tmp_path, tiny_imagefolder):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        r = subprocess.run([PY, "-m", "train", "--config", str(SMOKE_CONFIG), "--set", f"data.root={tiny_imagefolder}",
                            "--set", f"output_dir={out}", "--set", "metrics.enabled=false"],
                           env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    errors = _error_lines(r.stderr)
    assert len(errors) == 1, r.stderr
    assert f"Output folder '{out}' is in use by another training run (pid {holder.pid} on host {socket.gethostname()}, " \
           f"started " in errors[0], errors[0]
    assert errors[0].endswith(".") and "set another output_dir" in errors[0]
    assert not (out / "checkpoints").exists() and not (out / "config.yaml").exists(), "the refused run wrote nothing"


def test_a_stale_lock_is_recovered_with_a_log_line_and_released_at_the_end(tmp_path, caplog):
    out = tmp_path / "run"
    dead = _holder(out, after="import os, signal; os.kill(os.getpid(), signal.SIGKILL)")  # dies holding it
    dead.wait(30)
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == dead.pid
    caplog.set_level(logging.INFO, logger="train.runlock")
    with RunLock(out) as lock:
        info = lock.read()
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["started"]
        assert f"recovered a stale lock in {out}: the run that held it (pid {dead.pid} on host" in caplog.text
        with pytest.raises(RunLockError, match=rf"in use by another training run \(pid {os.getpid()} on host"):
            RunLock(out).acquire()  # held: even by this very process, a second acquisition is refused
    assert not (out / LOCK_NAME).exists(), "released at the end"

    # A lock file naming a live process that does not hold it (a recycled pid: its start time differs) is stale too.
    (out / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "x",
                                             "pid_start": 1}))
    caplog.clear()
    with RunLock(out):
        assert f"(pid {os.getppid()} on host" in caplog.text and "recovered a stale lock" in caplog.text


def test_other_ranks_refuse_a_live_run_of_another_job_and_accept_their_own(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    holder = _holder(out)  # inherits TORCHELASTIC_RUN_ID=job-a: rank 0 of job-a
    try:
        RunLock(out, rank=1).acquire()  # rank 1 of the same job: its own rank 0's lock
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
        with pytest.raises(RunLockError, match=rf"in use by another training run \(pid {holder.pid} on host"):
            RunLock(out, rank=1).acquire()
    finally:
        holder.kill()
        holder.wait()
    RunLock(out, rank=1).acquire()  # the holder is dead: rank 1 leaves the stale lock to rank 0
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid, "rank 1 only reads the lock"


def test_a_worker_whose_launcher_is_already_gone_exits_instead_of_training(tmp_path):
    """The race of the parent-death signal: a worker reparented before it could arm it stops with one sentence."""
    log = tmp_path / "orphan.log"
    # The shell exits at once; the trainer it started (as torchrun would, TORCHELASTIC_RUN_ID set) is reparented.
    script = (f"TORCHELASTIC_RUN_ID=r1 {PY} -m train --config {SMOKE_CONFIG} --set output_dir={tmp_path / 'o'} "
              f"> {log} 2>&1 &")
    subprocess.run(["bash", "-c", script], env=subprocess_env(), cwd=ROOT, check=True, timeout=30)
    deadline = time.time() + 60
    while time.time() < deadline and "error: " not in (log.read_text() if log.exists() else ""):
        time.sleep(0.2)
    text = log.read_text()
    assert "error: This worker's launcher (torchrun) exited before the worker started" in text, text[-2000:]
    assert "Traceback" not in text and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------- kill -9 of the launcher


def _live(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _workers(agent: int) -> list[psutil.Process]:
    found = []
    for p in psutil.Process(agent).children(recursive=True):
        try:
            if "RANK" in p.environ() and "train" in p.cmdline():
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_9_of_launch_local_leaves_no_worker_and_the_rerun_resumes(tmp_path):
    """`python -m launch local --nproc 2` on the demo data (Animal-MNIST, a small prepared subset): SIGKILL to its
    whole process group mid-training. torchrun's workers live in sessions of their own, so only their parent-death
    signal stops them: all are gone within 10 s. The same command, rerun at once (same metrics ports, same output
    folder), recovers the stale lock, resumes from the checkpoint and finishes. Before the kill, the same command
    started a second time is refused on both ranks with one sentence naming the running rank 0."""
    data = tmp_path / "animals"
    prepare_animals.prepare(data, max_per_class=12, log=lambda *_: None)
    out = tmp_path / "run"
    port = free_port()
    cmd = [PY, "-m", "launch", "local", "--nproc", "2", "--", "--config", str(SMOKE_CONFIG),
           "--set", f"data.root={data}", "--set", f"output_dir={out}", "--set", "train.max_steps=6",
           "--set", "train.checkpoint_every_steps=2", "--set", f"metrics.port={port}"]
    first_log = tmp_path / "first.log"
    workers: list[psutil.Process] = []
    with open(first_log, "w") as f:
        proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        # While it runs, the same command again is refused on every rank, naming the running rank 0. The first run is
        # paused (SIGSTOP: alive, still holding the lock) meanwhile, so it cannot get far ahead on a fast host.
        deadline = time.time() + 300
        while time.time() < deadline and not RunLock(out).read() and proc.poll() is None:
            time.sleep(0.1)
        holder = RunLock(out).read()
        assert holder and proc.poll() is None, first_log.read_text()[-3000:]
        paused = [psutil.Process(proc.pid), *_workers(proc.pid)]
        for p in paused:
            p.suspend()
        try:
            second = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
        finally:
            for p in paused:
                p.resume()
        errors = _error_lines(second.stdout + second.stderr)
        assert second.returncode != 0 and len(errors) == 2, (second.stdout + second.stderr)[-3000:]
        assert all(f"is in use by another training run (pid {holder['pid']} on host {holder['host']}" in e
                   for e in errors), errors
        # torchrun prints its own ChildFailedError traceback for a failed worker; none comes from our code.
        assert not re.search(r'File ".*/(train|launch)/', second.stderr), second.stderr[-3000:]

        marker = out / "checkpoints" / "step-00000002.pt"
        while time.time() < deadline and not marker.exists() and proc.poll() is None:
            time.sleep(0.1)
        assert marker.exists() and proc.poll() is None, first_log.read_text()[-3000:]
        workers = _workers(proc.pid)
        assert len(workers) == 2, workers
        assert all(os.getsid(w.pid) != os.getsid(proc.pid) for w in workers), "torchrun workers have their own sessions"
        steps_at_kill = sorted(p.name for p in (out / "checkpoints").glob("step-*.pt"))
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher (torchrun, exec'd by launch local) and its process group
        proc.wait(30)
        t0 = time.time()
        while _live(workers) and time.time() - t0 < 10:
            time.sleep(0.1)
        gone_after = time.time() - t0
        left = _live(workers)
        assert not left, f"workers outlived the killed launcher: {[(p.pid, p.cmdline()[-6:]) for p in left]}"
        # Orphans that simply finished within those seconds would pass the line above: they wrote on, though.
        written = sorted(p.name for p in (out / "checkpoints").glob("step-*.pt"))
        assert written[:len(steps_at_kill)] == steps_at_kill and not (out / "report.json").exists(), \
            f"workers outlived the killed launcher and kept writing: {written} after {steps_at_kill}"
        assert len(written) <= len(steps_at_kill) + 1, (written, steps_at_kill)  # at most a write already under way
        print(f"\nRUNLOCK workers gone {gone_after:.2f} s after kill -9 of the launcher")
    finally:  # never leave a worker behind, whatever failed
        for p in _live(workers + (_workers(proc.pid) if proc.poll() is None else [])):
            p.kill()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    r = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=400)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-4000:]
    assert "Address already in use" not in text
    assert f"recovered a stale lock in {out}" in text, text[-4000:]
    resumed = [line for line in text.splitlines() if "resuming from" in line]
    assert resumed and str(out / "checkpoints") in resumed[0], text[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["resumed"] is True and report["world_size"] == 2 and report["steps"] == 6
    assert not (out / LOCK_NAME).exists()
