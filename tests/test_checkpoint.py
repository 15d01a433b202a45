"""Checkpoint safety: atomic writes, checksums, fallback past corrupt files, refusal of malicious pickles, NaN stop."""
import logging
import pickle
import re
import subprocess

import pytest
import torch

from tests.conftest import PY, ROOT, SMOKE_CONFIG, subprocess_env
from train.checkpoint import CheckpointError, CheckpointManager, atomic_save, safe_load, verify


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
    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(CheckpointError, match="refused by the safe loader"):
        safe_load(p, check=False)
    from train.checkpoint import load_for_inference
    with pytest.raises(CheckpointError):
        load_for_inference(p)


def test_missing_checkpoint_is_clear(tmp_path):
    from train.checkpoint import load_for_inference
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
