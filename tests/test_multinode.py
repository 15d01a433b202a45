"""Multi-node for real: two `python -m launch multinode` processes on this machine are two nodes (one rank each,
c10d rendezvous on 127.0.0.1) that train one job together, with DDP and with DeepSpeed; and an elastic job
(`--nnodes 1:2`) that loses a node to SIGKILL, goes on with one, takes it back, and ends where the
uninterrupted run ends (final lr at schedule.eta_min, the same images seen within one global batch)."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from launch.torchrun import build_multinode_argv
from tests.conftest import PY, ROOT, SMOKE_CONFIG, free_port, kill_tree, subprocess_env
from train.config import load_config

pytestmark = pytest.mark.slow

# 48 training images, 4 per rank: 6 steps per epoch on two nodes, 12 on one. Enough epochs that a node can be
# killed after the step-4 checkpoint, the survivor can re-form the job alone (c10d waits its 30 s last call for
# more nodes) and the node can rejoin before the schedule ends; validation only at the end, to keep it short.
EPOCHS = 3


def node_cmd(rdzv: str, nnodes: str, data: Path, out: Path, *sets: str, engine: str = "ddp",
             max_restarts: int = 0) -> list[str]:
    overrides = ["--config", str(SMOKE_CONFIG), "--set", f"data.root={data}", "--set", f"output_dir={out}",
                 "--set", "metrics.enabled=false", "--set", "train.checkpoint_every_steps=4", "--set", "train.threads=1",
                 "--set", "train.eval_every_epochs=100"]
    for s in sets:
        overrides += ["--set", s]
    overrides += ["--set", "train.record_samples=true"]
    argv = [PY, "-m", "launch", "multinode", "--nnodes", nnodes, "--nproc-per-node", "1", "--rdzv-endpoint", rdzv,
            "--rdzv-id", f"job-{out.name}", "--max-restarts", str(max_restarts), "--engine", engine, "--", *overrides]
    # The launcher's own argv builder accepts exactly this command (what `launch multinode` execs).
    built = build_multinode_argv(nnodes, 1, rdzv, f"job-{out.name}", overrides, engine=engine, max_restarts=max_restarts,
                                 python=PY)
    assert built[:3] == [PY, "-m", "torch.distributed.run"] and f"--rdzv-endpoint={rdzv}" in built
    return argv


def start_node(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "a") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(OMP_NUM_THREADS="1"), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_port(endpoint: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    host, port = endpoint.rsplit(":", 1)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the rendezvous store never listened on {endpoint}")


def wait_all(procs, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    try:
        return [p.wait(max(1.0, deadline - time.time())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            kill_tree(p, group=True)
        raise


def run_two_nodes(tmp_path: Path, data: Path, name: str, *sets: str, engine: str = "ddp", timeout: float = 240):
    out, rdzv = tmp_path / name, f"127.0.0.1:{free_port()}"
    logs = [tmp_path / f"{name}-node{i}.log" for i in range(2)]
    procs = [start_node(node_cmd(rdzv, "2", data, out, *sets, engine=engine), log) for log in logs]
    rcs = wait_all(procs, timeout)
    texts = [log.read_text() for log in logs]
    assert rcs == [0, 0], "\n----\n".join(t[-3000:] for t in texts)
    return out, texts


def ranks_that_trained(out: Path) -> set[int]:
    """Global ranks that trained samples (train.record_samples: one file per rank, one line per step's indices)."""
    return {int(p.stem[4:]) for p in (out / "samples").glob("rank*.txt") if p.read_text().strip()}


@pytest.fixture(scope="module")
def uninterrupted(tiny_imagefolder, tmp_path_factory):
    """Two nodes x one rank, DDP over gloo, EPOCHS epochs: the reference the elastic run must end on."""
    return run_two_nodes(tmp_path_factory.mktemp("mn"), tiny_imagefolder, "ddp", f"train.epochs={EPOCHS}")


@pytest.mark.timeout(300)
def test_two_nodes_train_one_ddp_job(uninterrupted):
    out, texts = uninterrupted
    assert ranks_that_trained(out) == {0, 1}, "\n----\n".join(t[-2000:] for t in texts)
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["engine"] == "ddp" and report["steps"] == EPOCHS * 6
    assert (out / "checkpoints" / "last.pt").is_file()


@pytest.mark.timeout(300)
def test_two_nodes_train_one_deepspeed_job(tiny_imagefolder, tmp_path):
    out, texts = run_two_nodes(tmp_path, tiny_imagefolder, "ds", "train.max_steps=2", "deepspeed.zero_stage=2",
                               "optim.name=sgd", engine="deepspeed")
    assert ranks_that_trained(out) == {0, 1}, "\n----\n".join(t[-2000:] for t in texts)
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["engine"] == "deepspeed" and report["steps"] == 2


@pytest.mark.timeout(420)
def test_elastic_job_loses_a_node_goes_on_takes_it_back_and_ends_where_the_uninterrupted_run_ends(
        uninterrupted, tiny_imagefolder, tmp_path):
    ref_out, _ = uninterrupted
    ref = json.loads((ref_out / "report.json").read_text())
    out, rdzv = tmp_path / "elastic", f"127.0.0.1:{free_port()}"
    cmd = node_cmd(rdzv, "1:2", tiny_imagefolder, out, f"train.epochs={EPOCHS}", max_restarts=5)
    logs = [tmp_path / "elastic-node0.log", tmp_path / "elastic-node1.log"]
    # Node A starts first so that its launcher hosts the c10d store (the one at --rdzv-endpoint); node B is the one
    # that dies, as a worker node of a real cluster would.
    a = start_node(cmd, logs[0])
    wait_for_port(rdzv, a)
    b = start_node(cmd, logs[1])
    procs = [a, b]
    try:
        # Both nodes train (world 2) and a checkpoint exists: kill node B entirely.
        deadline = time.time() + 180
        while time.time() < deadline and not (out / "checkpoints" / "step-00000004.pt").exists() and a.poll() is None:
            time.sleep(0.2)
        assert (out / "checkpoints" / "step-00000004.pt").exists(), logs[0].read_text()[-3000:]
        assert a.poll() is None and b.poll() is None, "the run ended before a node could be killed"
        kill_tree(b, group=True)
        rank1_lines = len((out / "samples" / "rank1.txt").read_text().splitlines())
        # Node A re-forms the job alone (world 1) and goes on from the last checkpoint.
        deadline = time.time() + 150
        while time.time() < deadline and a.poll() is None and not re.search(r"world=1 ", logs[0].read_text()):
            time.sleep(0.5)
        assert re.search(r"world=1 ", logs[0].read_text()), logs[0].read_text()[-3000:]
        assert a.poll() is None, "the surviving node stopped instead of going on alone"
        # Node B comes back and rejoins: the group is re-formed at world 2 once more.
        mark = len(logs[1].read_text())
        world1 = logs[0].read_text().index("world=1 ")
        b = start_node(cmd, logs[1])
        procs = [a, b]
        rcs = wait_all(procs, 240)
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p, group=True)
    texts = [log.read_text() for log in logs]
    assert rcs == [0, 0], "\n----\n".join(t[-3000:] for t in texts)
    # Rank 1 exists only in a two-node group: its samples file grew after the kill, so the node came back and
    # trained; rank 0 (on either node) logged the re-formed world and the resume from the last checkpoint.
    assert len((out / "samples" / "rank1.txt").read_text().splitlines()) > rank1_lines, \
        "no rank 1 trained after the node was restarted:\n" + texts[1][mark:][-3000:]
    after = texts[0][world1 + 1:] + texts[1][mark:]
    assert re.search(r"world=2 ", after), "the job was never re-formed with two nodes"
    assert "resuming from" in texts[0][world1:], "the one-node attempt did not resume from the last checkpoint"

    report = json.loads((out / "report.json").read_text())
    cfg = load_config(SMOKE_CONFIG)
    eta_min = cfg.schedule.eta_min
    assert report["final_lr"] == pytest.approx(eta_min, rel=1e-9, abs=1e-12), \
        f"the schedule did not end at eta_min after the resizes: final lr {report['final_lr']} vs {eta_min}"
    global_batch = 2 * cfg.data.batch_size
    assert abs(report["images_seen"] - ref["images_seen"]) <= global_batch, (report["images_seen"], ref["images_seen"])
    assert ref["final_lr"] == pytest.approx(eta_min, rel=1e-9, abs=1e-12)
    assert report["world_size"] == 2 and report["resumed"] is True
