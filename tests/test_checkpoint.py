"""Checkpoint safety: atomic writes, checksums, fallback past corrupt files, refusal of malicious pickles, NaN stop."""
import hashlib
import logging
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import PY, ROOT, SMOKE_CONFIG, subprocess_env
from train.checkpoint import FORMAT, CheckpointError, CheckpointManager, atomic_save, safe_load, verify


def _state(v: float) -> dict:
    return {"model": {"w": torch.full((4,), v)}, "global_step": int(v)}


def test_atomic_save_and_verify(tmp_path):
    p = atomic_save(_state(1), tmp_path / "a.pt")
    verify(p)
    assert safe_load(p)["global_step"] == 1
    assert not list(tmp_path.glob(".*tmp")), "no temp files left behind"


def test_truncated_last_falls_back_to_previous_with_a_log_line(tmp_path, caplog):
    m = CheckpointManager(tmp_path, keep_last=3)
    m.save(_state(1), 1)
    m.save(_state(2), 2)
    data = m.last.read_bytes()
    m.last.write_bytes(data[: len(data) // 2])  # a kill mid-copy on a filesystem without atomic rename
    (tmp_path / "step-00000002.pt").write_bytes(data[:100])
    caplog.set_level(logging.WARNING)
    state, path = m.load_latest()
    assert path.name == "step-00000001.pt" and state["global_step"] == 1
    assert "corrupt or truncated" in caplog.text and "falling back" in caplog.text


def test_keep_last_k(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    for s in range(1, 5):
        m.save(_state(s), s, is_best=(s == 2))
    assert [p.name for p in m.step_files()] == ["step-00000003.pt", "step-00000004.pt"]
    assert safe_load(m.best)["global_step"] == 2 and safe_load(m.last)["global_step"] == 4


class _Evil:
    """A pickle that runs code when unpickled without the safe loader: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle code ran"))


def plant_payload(path: Path, marker: Path, checksum: bool = True) -> None:
    """A torch.save'd (zip format) checkpoint whose unpickling runs code, with a matching sidecar: only the loader's
    weights_only can stop it (the checksum cannot: whoever replaced the file replaced its checksum too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "model": {"w": torch.zeros(2)}, "optimizer": _Evil(marker), "global_step": 9}, path)
    if checksum:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")


def test_a_torch_saved_payload_with_a_matching_checksum_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned.txt"
    p = tmp_path / "evil.pt"
    plant_payload(p, marker)
    verify(p)   # the checksum matches: the refusal below is the safe loader's
    with pytest.raises(CheckpointError, match="refused by the safe loader"):
        safe_load(p)
    from train.inference import load_for_inference
    with pytest.raises(CheckpointError, match="refused by the safe loader"):
        load_for_inference(p)
    assert not marker.exists(), "the payload's code ran"


def _train(data, out, *sets, timeout=300):
    cmd = [PY, "-m", "train", "--config", str(SMOKE_CONFIG), "--set", f"data.root={data}", "--set", f"output_dir={out}",
           "--set", "metrics.enabled=false"]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _one_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    # (the sentence may follow a progress bar's last line: tqdm ends it without a newline when the run stops)
    errors = [line[line.index("error: "):] for line in stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and errors[0].endswith("."), stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_python_m_train_refuses_a_planted_last_pt_and_pretrained_file_without_running_them(tiny_imagefolder, tmp_path):
    """As a user meets it: `python -m train` on an output folder whose last.pt (with a matching .sha256) is a
    torch.save'd payload, and with model.pretrained pointing at one: exit 2, one sentence, the code never runs."""
    marker = tmp_path / "pwned.txt"
    out = tmp_path / "run"
    plant_payload(out / "checkpoints" / "last.pt", marker)
    r = _train(tiny_imagefolder, out, "train.max_steps=1")
    assert r.returncode == 2, r.stderr[-3000:]
    err = _one_error(r.stderr)
    assert "last.pt' was refused by the safe loader" in err and "train.resume=false" in err, err
    assert not marker.exists(), "the payload's code ran"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt", "last.pt.sha256"], "nothing written"

    pre = tmp_path / "resnet50.pth"
    plant_payload(pre, marker, checksum=False)
    r = _train(tiny_imagefolder, tmp_path / "fresh", "train.max_steps=1", f"model.pretrained={pre}")
    assert r.returncode == 2, r.stderr[-3000:]
    err = _one_error(r.stderr)
    assert f"Pretrained weights file '{pre}' could not be read safely" in err, err
    assert not marker.exists(), "the payload's code ran"


def test_missing_checkpoint_is_clear(tmp_path):
    from train.inference import load_for_inference
    with pytest.raises(CheckpointError, match="does not exist; train first"):
        load_for_inference(tmp_path / "nope.pt")


def test_nan_loss_stops_cleanly_and_leaves_no_poisoned_checkpoint(tiny_imagefolder, tmp_path):
    out = tmp_path / "nan"
    r = subprocess.run([PY, "-m", "train", "--config", str(SMOKE_CONFIG), "--set", f"data.root={tiny_imagefolder}",
                        "--set", f"output_dir={out}", "--set", "optim.name=sgd", "--set", "optim.lr=1e12",
                        "--set", "schedule.warmup_epochs=0", "--set", "train.checkpoint_every_steps=1",
                        "--set", "data.class_weights=false"],
                       env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error: Loss became NaN/inf at step" in r.stderr and "Traceback" not in r.stderr
    diverged = int(re.search(r"Loss became NaN/inf at step (\d+)", r.stderr).group(1))
    # Checkpoints exist (the loop below is not empty), and the newest one predates the divergence.
    steps = sorted(int(p.name[5:13]) for p in (out / "checkpoints").glob("step-*.pt"))
    assert steps and max(steps) < diverged, (steps, diverged)
    assert safe_load(out / "checkpoints" / "last.pt")["global_step"] == max(steps)
    for p in (out / "checkpoints").glob("*.pt"):
        state = safe_load(p)
        assert state["global_step"] < diverged
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()), p


@pytest.mark.parametrize("key", ["model", "train_model"])
def test_a_non_finite_model_state_is_never_written(tmp_path, key):
    """The save path checks weights (and buffers) finite first: nothing is written, the previous checkpoint stays last."""
    m = CheckpointManager(tmp_path, keep_last=3)
    m.save(_state(1), 1)
    bad = _state(2)
    bad[key] = {"w": torch.tensor([1.0, float("nan"), 2.0, 3.0]), "bn.running_var": torch.tensor([float("inf")]),
                "bn.num_batches_tracked": torch.tensor(5)}
    with pytest.raises(CheckpointError, match=r"^Refused to write a checkpoint at step 2: the model holds NaN/inf in "
                                              r"w, bn.running_var; the previous checkpoint is kept"):
        m.save(bad, 2)
    assert [p.name for p in m.step_files()] == ["step-00000001.pt"] and not list(tmp_path.glob(".*tmp"))
    assert safe_load(m.last)["global_step"] == 1


# ------------------------------------------------------------------------------------- crash consistency

KILL_POINTS = r"""
import os, signal, sys
from pathlib import Path
import torch
from train.checkpoint import CheckpointManager

root = Path(sys.argv[1])
def state(v): return {"model": {"w": torch.full((256,), float(v))}, "global_step": v}
template = root / "template"
m = CheckpointManager(template, keep_last=2)
m.save(state(1), 1, is_best=True)
m.save(state(2), 2)
for k in range(500):
    d = root / f"kill-{k:03d}"
    d.mkdir()
    for f in template.iterdir():   # hard links, as the manager leaves them (last.pt and step-2 share an inode)
        os.link(f, d / f.name)
    pid = os.fork()   # nothing here ran an OpenMP region, so forking is safe
    if pid == 0:
        n = [0]
        def point(fn):
            def wrapped(*a, **kw):
                if n[0] == k:
                    os.kill(os.getpid(), signal.SIGKILL)
                n[0] += 1
                return fn(*a, **kw)
            return wrapped
        for name in ("replace", "rename", "link", "unlink", "fsync"):
            setattr(os, name, point(getattr(os, name)))
        CheckpointManager(d, keep_last=2).save(state(3), 3, is_best=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status):
        print("completed at", k)
        break
    assert os.WTERMSIG(status) == signal.SIGKILL
"""


def test_a_sigkill_at_every_point_of_a_save_leaves_every_checkpoint_verifying(tmp_path):
    """save(step 3, best) after step 1 (best) and step 2: the writer is SIGKILLed before its k-th rename, link, unlink
    or fsync, for every k until a save completes. After each kill, with no repair: every *.pt (step files, last.pt,
    best.pt) verifies against its sidecar; best.pt is step 1 or 3, last.pt step 2 or 3; load_latest resumes from
    step >= 2 and leaves no temp file and no sidecar without its checkpoint."""
    r = subprocess.run([PY, "-c", KILL_POINTS, str(tmp_path)], env=subprocess_env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "completed at" in r.stdout, r.stderr[-3000:]
    points = int(r.stdout.split()[-1])
    assert points >= 10, r.stdout   # temp write, sidecars, renames, links, fsyncs, pruning
    for k in range(points):
        d = tmp_path / f"kill-{k:03d}"
        for p in sorted(d.glob("*.pt")):
            verify(p)   # raises: e.g. the old best.pt beside the new best.pt.sha256
        assert safe_load(d / "best.pt")["global_step"] in (1, 3), k
        assert safe_load(d / "last.pt")["global_step"] in (2, 3), k
        state, path = CheckpointManager(d).load_latest()
        assert state["global_step"] >= 2, (k, path)
        assert not list(d.glob(".*.tmp")), k
        assert all(s.with_name(s.name[:-7]).exists() for s in d.glob("*.sha256")), (k, sorted(os.listdir(d)))
    done = tmp_path / f"kill-{points:03d}"
    assert safe_load(done / "best.pt")["global_step"] == 3 and safe_load(done / "last.pt")["global_step"] == 3


def test_every_rename_is_made_durable_by_a_directory_fsync_before_save_returns(tmp_path, monkeypatch):
    """SIGKILL keeps the page cache, so only the order of fsyncs protects against power loss: the bytes of every
    renamed file are fsync'd before its rename, and the folder is fsync'd after each rename, before the next one."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append((f"fsync-{kind}", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    m = CheckpointManager(tmp_path, keep_last=2)
    m.save(_state(1), 1, is_best=True)
    m.save(_state(2), 2, is_best=True)
    monkeypatch.undo()
    renames = [i for i, e in enumerate(events) if e[0] == "replace"]
    assert len(renames) >= 6, events
    for n, i in enumerate(renames):
        src = events[i][1]
        if ".link.tmp" not in src:   # a hard link's bytes are those of the step file, fsync'd when it was written
            assert ("fsync-file", src) in events[:i], (src, events[:i])
        nxt = renames[n + 1] if n + 1 < len(renames) else len(events)
        assert ("fsync-dir", str(tmp_path)) in events[i + 1:nxt], (events[i], events[i + 1:nxt])


# ------------------------------------------------------------------------------------- disk full, export


def _limit_file_size(limit: int):
    """preexec_fn: files the child writes may not grow past ``limit`` bytes (RLIMIT_FSIZE; Python ignores SIGXFSZ, so
    the write fails with EFBIG as it would with ENOSPC on a full disk)."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.slow
def test_a_checkpoint_write_that_fails_for_lack_of_space_stops_in_one_sentence_and_keeps_the_previous(
        tiny_imagefolder, tmp_path):
    """2 steps written, then the same folder to 4 steps with files capped at 64 MB (a checkpoint is ~300 MB): the
    first save fails; the run stops with exit 2 and one sentence naming the file and the fix, no temp file is left,
    and the newest checkpoint still verifies and resumes."""
    out = tmp_path / "run"
    r = _train(tiny_imagefolder, out, "train.max_steps=2", "train.checkpoint_every_steps=1")
    assert r.returncode == 0, r.stderr[-3000:]
    cmd = [PY, "-m", "train", "--config", str(SMOKE_CONFIG), "--set", f"data.root={tiny_imagefolder}",
           "--set", f"output_dir={out}", "--set", "metrics.enabled=false", "--set", "train.max_steps=4",
           "--set", "train.checkpoint_every_steps=1"]
    r = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=300,
                       preexec_fn=_limit_file_size(64 << 20))
    assert r.returncode == 2, r.stderr[-3000:]
    err = _one_error(r.stderr)
    assert re.match(r"error: Could not write '.*step-00000003\.pt' \(the write stopped at the file size limit of 64 "
                    r"MiB \(ulimit -f\); \d+ MiB free in '.*'\); the "
                    r"previous checkpoint is kept and verifies\. Free disk space", err), err
    ck = out / "checkpoints"
    assert not list(ck.glob(".*.tmp")) and not (ck / "step-00000003.pt").exists(), sorted(os.listdir(ck))
    state, path = CheckpointManager(ck).load_latest()
    assert state["global_step"] == 2 and path.name == "step-00000002.pt"


def test_a_full_disk_while_writing_the_checksum_keeps_the_previous_checkpoint(tmp_path):
    """A real full filesystem (a 1 MiB tmpfs, root only; elsewhere unshare -rm gives one): the checkpoint's bytes fit,
    its sidecar does not. The save fails with CheckpointError in one sentence; the previous checkpoint verifies."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    prefix = [] if os.geteuid() == 0 else ["unshare", "-rm"]
    script = r"""
import os, sys, subprocess, torch
from pathlib import Path
from train.checkpoint import CheckpointError, CheckpointManager
mnt = Path(sys.argv[1])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
try:
    m = CheckpointManager(mnt / "ck", keep_last=5)
    m.save({"model": {"w": torch.zeros(10)}, "global_step": 1}, 1)
    st = os.statvfs(mnt)
    # Fill the disk but for the pages the next checkpoint's bytes need, so its sidecar finds no room.
    need = (os.path.getsize(mnt / "ck" / "step-00000001.pt") + 4095) // 4096
    with open(mnt / "filler", "wb") as f:
        f.write(b"\0" * ((st.f_bavail - need) * st.f_frsize))
    try:
        m.save({"model": {"w": torch.ones(10)}, "global_step": 2}, 2)
        print("SAVED")
    except CheckpointError as err:
        print("ERROR", err)
    from train.checkpoint import verify
    for p in (mnt / "ck").glob("*.pt"):
        verify(p)
    state, path = m.load_latest()
    print("LATEST", path.name, state["global_step"], sorted(os.listdir(mnt / "ck")))
finally:
    subprocess.run(["umount", str(mnt)], check=True)
"""
    r = subprocess.run([*prefix, PY, "-c", script, str(mnt)], env=subprocess_env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ERROR Could not write '" in r.stdout and "step-00000002.pt' (No space left on device" in r.stdout, r.stdout
    assert "the previous checkpoint is kept and verifies" in r.stdout, r.stdout
    latest = r.stdout.split("LATEST ")[1].split()
    assert latest[:2] == ["step-00000001.pt", "1"], r.stdout


def test_export_refuses_a_checkpoint_without_its_checksum_or_with_a_wrong_one(tmp_path):
    from serve.errors import ServeError
    from serve.export import load_checkpoint

    m = CheckpointManager(tmp_path, keep_last=2)
    from train.config import load_config
    from train.models import create_model
    cfg = load_config(str(SMOKE_CONFIG), [])
    model = create_model(cfg.model, 3, load_pretrained=False)
    m.save({"model": model.state_dict(), "config": cfg.to_dict(), "classes": ["a", "b", "c"], "global_step": 1}, 1,
           is_best=True)
    load_checkpoint(m.best)   # the good case loads
    side = tmp_path / "best.pt.sha256"
    digest = side.read_text()
    side.unlink()
    with pytest.raises(ServeError, match=r"has no checksum file 'best.pt.sha256' \(copy it along with the checkpoint; "
                                         r"for a file you trust: sha256sum best.pt > best.pt.sha256\)"):
        load_checkpoint(m.best)
    side.write_text(digest.replace(digest[0], "0" if digest[0] != "0" else "1", 1))
    with pytest.raises(ServeError, match="is corrupt or truncated"):
        load_checkpoint(m.best)
