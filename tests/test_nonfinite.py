"""Non-finite losses are skipped on the device and agreed on at log steps: no per-step host read and no per-step
collective in the loop, a non-finite step leaves weights and optimizer state alone, and train.nan_policy acts at the
next agreement (stop: EngineError before any checkpoint; skip: counted and warned)."""
from __future__ import annotations

import logging

import pytest
import torch

import train.loop as loop
from tests.conftest import SMOKE_CONFIG
from train.config import load_config
from train.engine import EngineError, Trainer
from train.optim import NonFiniteGuard

STEPS = 6


@pytest.mark.parametrize("fused", [True, False])
def test_guard_skips_a_nonfinite_step_on_the_device(fused):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, fused=fused)
    guard = NonFiniteGuard(opt, torch.device("cpu"))
    for i, x in enumerate([torch.randn(3, 4), torch.full((3, 4), float("nan")), torch.randn(3, 4)]):
        before = [p.detach().clone() for p in m.parameters()]
        moments = [s["exp_avg"].clone() for s in opt.state.values()]
        loss = m(x).sum()
        guard.watch(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        guard.settle()
        changed = [not torch.equal(a, b) for a, b in zip(before, m.parameters())]
        if i == 1:   # weights, moments and step counts untouched
            assert not any(changed)
            assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, opt.state.values()))
            assert {int(s["step"]) for s in opt.state.values()} == {1}
        else:
            assert all(changed)
    assert float(guard.count) == 1.0 and not hasattr(opt, "found_inf")


def _trainer(tiny_imagefolder, tmp_path, *sets):
    cfg = load_config(SMOKE_CONFIG, [f"data.root={tiny_imagefolder}", f"output_dir={tmp_path / 'run'}",
                                     "metrics.enabled=false", "train.precision=fp32", "train.epochs=50",
                                     "train.checkpoint_every_steps=0", "train.log_every_steps=1000", *sets])
    return Trainer(cfg)


def _batches(nan_at: int = -1):
    g = torch.Generator().manual_seed(0)
    for i in range(STEPS):
        x = torch.randn(4, 3, 32, 32, generator=g)
        yield (x * float("nan") if i == nan_at else x), torch.arange(4)


class _HostReads:
    """Counts reads of floating/bool tensor values by the host (item, bool, float, tolist) and calls of the loop's
    agreement collective while entered."""

    def __init__(self, monkeypatch):
        self.reads, self.collectives = 0, 0
        for name in ("item", "__bool__", "__float__", "tolist"):
            orig = getattr(torch.Tensor, name)

            def counted(t, *a, _orig=orig, **kw):
                if t.is_floating_point() or t.dtype == torch.bool:
                    self.reads += 1
                return _orig(t, *a, **kw)
            monkeypatch.setattr(torch.Tensor, name, counted)
        reduce = loop.all_reduce_mean

        def counted_reduce(*a, **kw):
            self.collectives += 1
            return reduce(*a, **kw)
        monkeypatch.setattr(loop, "all_reduce_mean", counted_reduce)


def test_no_host_read_or_collective_per_step(tiny_imagefolder, tmp_path, monkeypatch):
    t = _trainer(tiny_imagefolder, tmp_path)
    try:
        assert t.board.writer is None and not (t.out / "tensorboard").exists()   # TensorBoard: off by default
        t.backend.train()
        probe = _HostReads(monkeypatch)
        stats = loop.train_one_epoch(t, list(_batches()), STEPS, 0, "probe")
        assert stats.steps == STEPS and stats.clean
        # one agreement at the end of the epoch; a per-step isfinite()/float(loss) or all_agree would give >= STEPS
        assert probe.collectives == 1, probe.collectives
        assert probe.reads <= 3, probe.reads
    finally:
        t.close()


def test_nan_step_skipped_then_stop_policy_raises_at_the_agreement(tiny_imagefolder, tmp_path):
    t = _trainer(tiny_imagefolder, tmp_path, "train.nan_policy=stop")
    try:
        t.backend.train()
        batches = _batches(nan_at=2)
        loop.train_one_epoch(t, [next(batches) for _ in range(2)], 2, 0, "good")
        before = {k: v.clone() for k, v in t.backend.module.state_dict().items() if "running" not in k and "num_batches" not in k}
        with pytest.raises(EngineError, match=r"Loss became NaN/inf at 1 of steps 3-6"):
            loop.train_one_epoch(t, list(batches), STEPS - 2, 2, "bad")
        assert t.nan_skips == 1 and t.progress.global_step == STEPS
        after = t.backend.module.state_dict()
        # steps 4-6 trained on finite batches after the skipped one; the skipped one left no NaN behind
        assert all(torch.isfinite(after[k]).all() for k in before), "a NaN reached the weights"
        assert not (t.out / "checkpoints" / "last.pt").exists()
    finally:
        t.close()


def test_nan_skip_policy_counts_at_log_steps(tiny_imagefolder, tmp_path, caplog):
    t = _trainer(tiny_imagefolder, tmp_path, "train.nan_policy=skip", "train.log_every_steps=2")
    try:
        t.backend.train()
        with caplog.at_level(logging.WARNING, logger="train.engine"):
            stats = loop.train_one_epoch(t, list(_batches(nan_at=4)), STEPS, 0, "skip")
        assert t.nan_skips == 1 and not stats.clean   # found at the step-6 log: no epoch-end checkpoint right after
        assert "non-finite loss at 1 of steps 5-6: step skipped (1 so far)" in caplog.text
    finally:
        t.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ddp_a_nan_on_one_rank_is_skipped_by_every_rank_without_a_collective(tiny_imagefolder, tmp_path):
    """2 DDP ranks (gloo); rank 1's 3rd batch is NaN. The averaged gradients carry it to rank 0, whose guard skips the
    same step: both ranks end with identical, finite weights, AdamW counted 5 steps, and both agreed on 1 skip."""
    import subprocess
    from pathlib import Path

    from tests.conftest import PY, ROOT, subprocess_env

    out = tmp_path / "run"
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(Path(__file__).with_name("nonfinite_probe.py")), "2", str(SMOKE_CONFIG), f"data.root={tiny_imagefolder}",
           f"output_dir={out}", "metrics.enabled=false", "train.precision=fp32", "train.epochs=50",
           "train.nan_policy=skip", "train.log_every_steps=1000", "train.checkpoint_every_steps=0"]
    r = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stderr[-4000:]
    a, b = (torch.load(out / f"nonfinite-rank{i}.pt", weights_only=True) for i in (0, 1))
    assert a["nan_skips"] == b["nan_skips"] == 1 and a["steps"] == b["steps"] == STEPS
    assert a["optimizer_steps"] == b["optimizer_steps"] == [STEPS - 1]
    for k, v in a["params"].items():
        assert torch.isfinite(v).all() and torch.equal(v, b["params"][k]), k
