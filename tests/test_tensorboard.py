"""metrics.tensorboard=true: a real training run writes TensorBoard event files under <output_dir>/tensorboard on
rank 0 with the loss, lr, throughput and validation top-1, read back with TensorBoard's own EventAccumulator."""
from __future__ import annotations

from tests.conftest import SMOKE_CONFIG, require
from train.config import load_config
from train.engine import Trainer


def test_tensorboard_scalars_read_back(tiny_imagefolder, tmp_path):
    event_accumulator = require("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    cfg = load_config(SMOKE_CONFIG, [f"data.root={tiny_imagefolder}", f"output_dir={out}", "metrics.enabled=false",
                                     "metrics.tensorboard=true", "train.precision=fp32", "train.max_steps=4",
                                     "train.log_every_steps=2", "train.checkpoint_every_steps=0"])
    t = Trainer(cfg)
    try:
        report = t.fit()
    finally:
        t.close()
    acc = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/images_per_second", "val/top1"} <= tags, tags
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4]
    (val,) = acc.Scalars("val/top1")   # the one epoch end, at step 4; the report's val is the best checkpoint's
    assert val.step == 4 and 0.0 <= val.value <= 1.0 and "val_top1" in report
    assert report["provenance"]["data_fingerprint"] and report["provenance"]["config_fingerprint"]
    assert all(e.value > 0 for e in acc.Scalars("train/lr"))
