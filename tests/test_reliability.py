"""Reliability of training, with real processes: SIGKILL at random moments (also mid checkpoint write), elastic restart
under torchrun, NaN skip policy, data faults through a real DALI run, DeepSpeed resume under the weights_only loader.

Serving faults live in tests/test_reliability_serve.py. docs/reliability.md lists every fault and the test proving it.
Set RELIABILITY_SEED to replay the random kill moments of a failed run (the seed is in every assertion message).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import PY, ROOT, SMOKE_CONFIG, subprocess_env
from train.checkpoint import SUMS, CheckpointError, CheckpointManager, seal_folder, verify, verify_folder

pytestmark = pytest.mark.slow
SEED = int(os.environ.get("RELIABILITY_SEED", time.time_ns() % 100_000))


def train_cmd(data: Path, out: Path, *sets: str) -> list[str]:
    args = [PY, "-m", "train", "--config", str(SMOKE_CONFIG), "--set", f"data.root={data}", "--set", f"output_dir={out}"]
    for s in sets:
        args += ["--set", s]
    return args


def run(cmd: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=subprocess_env(**env), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _killpg(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer and anything it started (own session)
    except ProcessLookupError:
        pass
    proc.wait(30)


def _steps(ckdir: Path) -> list[int]:
    return sorted(int(p.name[5:13]) for p in ckdir.glob("step-*.pt"))


def audit_checkpoints(ckdir: Path, log_text: str) -> dict:
    """After a kill, with no repair: every checkpoint (step files, last.pt, best.pt) verifies, and nothing acknowledged
    is lost."""
    bad = []
    for p in sorted(ckdir.glob("*.pt")):
        try:
            verify(p)
        except CheckpointError:
            bad.append(p.name)
    assert not bad, f"checkpoints that do not verify after a kill: {bad} (seed {SEED})"
    tmp_left = len(list(ckdir.glob(".*.tmp")))
    acknowledged = max((int(s) for s in re.findall(r"checkpoint saved at step (\d+)", log_text)), default=0)
    found = CheckpointManager(ckdir).load_latest()
    assert not list(ckdir.glob(".*.tmp")), "load_latest removes unfinished writes"
    if found is None:  # killed inside the very first write: nothing was acknowledged, nothing to resume
        assert acknowledged == 0 and not _steps(ckdir), (sorted(os.listdir(ckdir)), SEED)
        return {"bad": bad, "resumable_step": 0, "acknowledged": 0, "tmp_left": tmp_left}
    state, path = found
    assert path.name not in bad
    # The log line is written after the save returns: every step the trainer reported saved is still there.
    assert state["global_step"] >= acknowledged, (state["global_step"], acknowledged, SEED)
    return {"bad": bad, "resumable_step": state["global_step"], "acknowledged": acknowledged, "tmp_left": tmp_left}


# ------------------------------------------------------------------------------------- SIGKILL storm + resume


STORM = ("train.checkpoint_every_steps=1", "train.max_steps=6", "metrics.enabled=false")
MIN_KILLS, MAX_KILLS = 3, 6


@pytest.mark.timeout(900)
def test_sigkill_at_random_moments_during_checkpoint_writes_then_resume_equals_uninterrupted(tiny_imagefolder, tmp_path):
    """checkpoint_every_steps=1 (~300 MB written per step, so kills land inside writes); SIGKILLs at random moments and
    aimed at writes, repeated (at most 6) until at least one provably landed inside a write (the killed process left a
    temp file of an unfinished write behind); after each kill every step file verifies and the resumable step is >= the
    last one logged as saved; then `last.pt` is truncated on purpose, and the same command resumes (logging the
    fallback) to the same weights as a run never interrupted."""
    rng = random.Random(SEED)
    ref = tmp_path / "ref"
    r = run(train_cmd(tiny_imagefolder, ref, *STORM))
    assert r.returncode == 0, r.stderr[-3000:]

    out = tmp_path / "killed"
    ck = out / "checkpoints"
    cmd = train_cmd(tiny_imagefolder, out, *STORM)
    audits, finished_early = [], False
    for i in range(MAX_KILLS):
        in_write = sum(a["tmp_left"] > 0 for a in audits)
        if i >= MIN_KILLS and in_write:
            break
        log_path = tmp_path / f"run{i}.log"
        before = max(_steps(ck), default=0)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            deadline = time.time() + 180
            # Wait until this run has made progress (a new checkpoint), then kill at a random moment, or, while no kill
            # has landed inside a write yet, as soon as the next write's temp file appears (a write takes ~1 s here:
            # ~300 MB of weights and AdamW state, fsync'd).
            while time.time() < deadline and proc.poll() is None:
                if max(_steps(ck), default=0) > before:
                    break
                time.sleep(0.05)
            if i >= 1 and not in_write:
                while time.time() < deadline and proc.poll() is None and not list(ck.glob(".step-*.tmp")):
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.2))
            elif i == MIN_KILLS - 1:   # aimed at the last save, the one that also updates best.pt (end of the run)
                while time.time() < deadline and proc.poll() is None and not list(ck.glob(".step-00000006.pt.*.tmp")):
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 1.2))
            else:
                time.sleep(rng.uniform(0.0, 1.5))
            if proc.poll() is not None:
                finished_early = proc.returncode == 0
                assert proc.returncode == 0, log_path.read_text()[-3000:]
                break
        finally:
            _killpg(proc)
        audits.append(audit_checkpoints(ck, log_path.read_text()))
        assert not (out / "report.json").exists()
    # The claim under test: kills that land INSIDE a checkpoint write lose nothing acknowledged.
    assert any(a["tmp_left"] > 0 for a in audits), f"no kill landed inside a write: {audits} (seed {SEED})"
    assert len(audits) >= MIN_KILLS or finished_early, (audits, SEED)

    # A disk fault on top: the newest `last.pt` is truncated. The rerun must detect it, say so, and fall back.
    assert (ck / "last.pt").exists(), (audits, SEED)
    data = (ck / "last.pt").read_bytes()
    (ck / "last.pt").write_bytes(data[: len(data) // 3])
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = [line for line in r.stderr.splitlines() if "resuming from" in line]
    assert resumed and "step-" in resumed[0], (resumed, audits, SEED)
    assert "corrupt or truncated" in r.stderr and "falling back to the previous checkpoint" in r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["resumed"] is True and report["steps"] == 6
    a = torch.load(ref / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(ck / "last.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k} (seed {SEED}): {m}")
    verify(ck / "best.pt")   # the file export reads: complete, and the one the run evaluated last
    assert torch.load(ck / "best.pt", weights_only=True)["global_step"] == 6
    print(f"\nRELIABILITY kill-storm seed={SEED} audits={audits} resumed={resumed[0].split('INFO')[-1].strip()}")


# ------------------------------------------------------------------------------------- elastic restart


def _workers(agent_pid: int):
    import psutil

    found = {}
    for p in psutil.Process(agent_pid).children(recursive=True):
        try:
            env = p.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "RANK" in env and "train" in " ".join(p.cmdline()):
            found[int(env["RANK"])] = p
    return found


def _elastic_cmd(data: Path, out: Path) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
            "-m", "train", "--config", str(SMOKE_CONFIG), "--set", f"data.root={data}", "--set", f"output_dir={out}",
            "--set", "train.epochs=2", "--set", "train.checkpoint_every_steps=2", "--set", "metrics.enabled=false"]


@pytest.fixture(scope="module")
def elastic_reference(tiny_imagefolder, tmp_path_factory) -> Path:
    """The same 2-rank torchrun run, never interrupted (shared by both victims)."""
    out = tmp_path_factory.mktemp("elastic-ref") / "run"
    r = run(_elastic_cmd(tiny_imagefolder, out), timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return out


def _train_steps(out: Path) -> list[int]:
    lines = (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip())
    return [rec["step"] for rec in lines if "loss" in rec]


@pytest.mark.parametrize("victim_rank", [0, 1])
@pytest.mark.timeout(600)
def test_elastic_restart_after_a_worker_is_killed_completes_from_the_last_checkpoint(tiny_imagefolder, tmp_path,
                                                                                    victim_rank, elastic_reference):
    """torchrun --max-restarts 1: SIGKILL one rank mid-epoch; the agent restarts the group, which resumes from the
    newest checkpoint on disk when the old group is gone (the restarted group's first step is the one after it),
    finishes with exit 0 and a report, and ends with the weights of the uninterrupted run."""
    import psutil

    out = tmp_path / "elastic"
    log_path = tmp_path / "elastic.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_elastic_cmd(tiny_imagefolder, out), env=subprocess_env(), cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        marker = out / "checkpoints" / "step-00000002.pt"
        deadline = time.time() + 240
        while time.time() < deadline and not marker.exists() and proc.poll() is None:
            time.sleep(0.1)
        assert marker.exists(), log_path.read_text()[-3000:]
        workers = _workers(proc.pid)
        assert set(workers) == {0, 1}, workers
        workers[victim_rank].send_signal(signal.SIGKILL)
        # The agent stops the survivor before it restarts the group: once both are gone, nothing of the first attempt
        # can write any more, and the restarted workers are still importing torch.
        gone, alive = psutil.wait_procs(list(workers.values()), timeout=60)
        assert not alive, alive
        last_at_restart = max(_steps(out / "checkpoints"))
        rc = proc.wait(300)
    finally:
        _killpg(proc) if proc.poll() is None else None
    text = log_path.read_text()
    assert rc == 0, text[-4000:]
    assert "failed (exitcode: -9)" in text, "the agent saw the killed worker (and then restarted the group)"
    resumed = [line for line in text.splitlines() if "resuming from" in line]
    assert resumed, text[-4000:]
    steps = _train_steps(out)
    restart_at = next((i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), steps.index(last_at_restart + 1))
    assert steps[restart_at] == last_at_restart + 1, (steps, last_at_restart, resumed[0])
    assert sorted(set(steps)) == list(range(1, 13)), steps
    report = json.loads((out / "report.json").read_text())
    assert report["resumed"] is True and report["steps"] == 12 and report["world_size"] == 2
    assert audit_checkpoints(out / "checkpoints", text)["bad"] == []
    a = torch.load(elastic_reference / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 12
    diff = max(float((a["model"][k].float() - v.float()).abs().max()) for k, v in b["model"].items())
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    print(f"\nRELIABILITY elastic (rank {victim_rank} killed): resumed after step {last_at_restart}; "
          f"max |w - w_uninterrupted| = {diff:.3g}; {resumed[0].split('INFO')[-1].strip()}")


# ------------------------------------------------------------------------------------- NaN skip policy


def assert_checkpoints_predate(ckdir: Path, divergence_step: int) -> list[int]:
    """Checkpoints exist, every one verifies and holds finite weights, and the newest predates the divergence."""
    steps = _steps(ckdir)
    assert steps, f"no checkpoint was written before step {divergence_step} diverged: {sorted(os.listdir(ckdir))}"
    assert max(steps) < divergence_step, (steps, divergence_step)
    for p in sorted(ckdir.glob("*.pt")):
        verify(p)
        state = torch.load(p, weights_only=True)
        assert state["global_step"] < divergence_step, (p.name, state["global_step"], divergence_step)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()), p
    return steps


@pytest.mark.timeout(300)
def test_nan_skip_policy_counts_skips_then_stops_cleanly(tiny_imagefolder, tmp_path):
    out = tmp_path / "nan"
    r = run(train_cmd(tiny_imagefolder, out, "optim.name=sgd", "optim.lr=1e12", "schedule.warmup_epochs=0",
                      "train.checkpoint_every_steps=1", "data.class_weights=false", "train.nan_policy=skip",
                      "train.max_nan_skips=3", "metrics.enabled=false"))
    assert r.returncode == 2, r.stderr[-2000:]
    skips = re.findall(r"non-finite loss at step (\d+): step skipped \((\d+) so far\)", r.stderr)
    assert [n for _, n in skips] == ["1", "2", "3"], r.stderr[-2000:]
    assert "error: Loss became NaN/inf" in r.stderr and "Traceback" not in r.stderr
    assert_checkpoints_predate(out / "checkpoints", int(skips[0][0]))


# ------------------------------------------------------------------------------------- data faults


@pytest.fixture
def broken_folder(tmp_path, tiny_imagefolder):
    dst = tmp_path / "images"
    shutil.copytree(tiny_imagefolder, dst)
    good = (dst / "train" / "square" / "square_000.png").read_bytes()
    (dst / "train" / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (dst / "train" / "square" / "truncated.png").write_bytes(good[: len(good) // 2])
    (dst / "train" / "square" / "zero.jpg").write_bytes(b"")
    (dst / "train" / "triangle" / "notes.txt").write_text("not an image")
    (dst / "train" / "triangle" / "Thumbs.db").write_bytes(os.urandom(64))
    (dst / "val" / "circle" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return dst


@pytest.mark.timeout(400)
def test_data_faults_dali_run_skips_and_reports_or_fails_in_one_sentence(broken_folder, tmp_path):
    # on_corrupt=skip: a real DALI (CPU) training run trains, evaluates, and reports how much it skipped.
    out = tmp_path / "dali"
    r = run(train_cmd(broken_folder, out, "data.backend=dali", "data.on_corrupt=skip", "data.verify=true",
                      "train.max_steps=3", "metrics.enabled=false"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train: skipped 3 unreadable image(s)" in r.stderr and "val: skipped 1 unreadable image(s)" in r.stderr
    assert "train: ignored 2 non-image file(s)" in r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["data_backend"] == "dali" and report["steps"] == 3 and report["test_images"] == 18

    # on_corrupt=fail (the default), an empty class, a class only in val: exit 2, one sentence, no traceback.
    def refused(needle, *args):
        r = run(train_cmd(broken_folder, tmp_path / "fail", "data.backend=dali", "metrics.enabled=false", *args))
        assert r.returncode == 2 and re.search(needle, r.stderr), (needle, r.stderr[-2000:])
        assert "Traceback" not in r.stderr

    refused(r"error: 3 unreadable image\(s\) in .*train'.*data.on_corrupt=skip", "data.verify=true")
    (broken_folder / "train" / "hexagon").mkdir()
    refused(r"error: Class folder .*hexagon' has no images", "data.on_corrupt=skip")
    (broken_folder / "train" / "hexagon").rmdir()
    (broken_folder / "val" / "star").mkdir()
    shutil.copy(broken_folder / "val" / "circle" / "circle_000.png", broken_folder / "val" / "star" / "x.png")
    r = run(train_cmd(broken_folder, tmp_path / "fail", "data.backend=dali", "data.on_corrupt=skip", "metrics.enabled=false"))
    assert r.returncode == 2 and "class folders not in train/: ['star']" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------- DeepSpeed resume, safe loader


class _Evil:
    """A pickle that runs code when loaded: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle code ran"))


@pytest.mark.timeout(1500)
def test_deepspeed_resume_works_under_the_weights_only_loader_and_refuses_code(tiny_imagefolder, tmp_path):
    """ZeRO-1 fp32, one process: 2 steps, then the same output_dir to 4 steps resumes through DeepSpeed's own
    load_checkpoint with our weights_only loader; every tag carries a SHA256SUMS. A SIGKILL inside the next tag's save
    leaves it unsealed, and the rerun falls back past it. Then torch.save'd payloads with rewritten checksums are
    planted in the ZeRO optimizer-state file and in the model-states file: each rerun (the real resume path) is
    refused, the code never runs, nothing is trained; with the files restored the run resumes and finishes."""
    out = tmp_path / "ds"
    ds = out / "checkpoints" / "deepspeed"
    base = ("engine=deepspeed", "deepspeed.zero_stage=1", "train.precision=fp32", "metrics.enabled=false")
    r = run(train_cmd(tiny_imagefolder, out, *base, "train.max_steps=2"), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(train_cmd(tiny_imagefolder, out, *base, "train.max_steps=4"), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = [line for line in r.stderr.splitlines() if "resuming from" in line]
    assert resumed and "step-00000002" in resumed[0], r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["engine"] == "deepspeed" and report["resumed"] is True and report["steps"] == 4
    tag = ds / "step-00000004"
    assert tag.is_dir() and (ds / "latest").read_text().strip() == "step-00000004"
    verify_folder(tag)

    # SIGKILL inside the save of step 5 (DeepSpeed writes its files in place, ~300 MB here): the tag stays unsealed.
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(train_cmd(tiny_imagefolder, out, *base, "train.max_steps=6",
                                          "train.checkpoint_every_steps=1"),
                                env=subprocess_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not list((ds / "step-00000005").glob("*.pt")):
            time.sleep(0.005)
    finally:
        _killpg(proc)
    torn = ds / "step-00000005"
    assert torn.is_dir() and not (torn / SUMS).exists(), (sorted(os.listdir(ds)), log_path.read_text()[-2000:])
    assert (ds / "latest").read_text().strip() == "step-00000004", "latest never names an unfinished save"

    # torch.save'd payloads (zip format, what DeepSpeed writes) whose unpickling runs code, planted one file at a time:
    # the ZeRO optimizer-state file, then the model-states file. Each rerun must refuse, and the code never run.
    for pattern in ("*optim_states.pt", "*model_states.pt"):
        victim = next(tag.glob(pattern))
        original = victim.read_bytes()
        ran = tmp_path / f"pwned-{pattern[1:6]}.txt"
        torch.save({"optimizer_state_dict": _Evil(ran), "module": _Evil(ran)}, victim)
        seal_folder(tag)   # whoever planted it also rewrote the checksums: only the loader can refuse it
        r = run(train_cmd(tiny_imagefolder, out, *base, "train.max_steps=6"), timeout=400)
        assert not ran.exists(), f"the code planted in {victim.name} ran"
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert "could not be loaded safely (Weights only load failed" in r.stderr, r.stderr[-3000:]
        assert "step-00000005' has no SHA256SUMS (its save did not finish); falling back" in r.stderr, r.stderr[-3000:]
        victim.write_bytes(original)
        seal_folder(tag)
    r = run(train_cmd(tiny_imagefolder, out, *base, "train.max_steps=6"), timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr and "step-00000004" in r.stderr, r.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["steps"] == 6
    verify_folder(ds / "step-00000006")
