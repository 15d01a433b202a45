"""DALI loaders: built once per (split, rank, size) and re-planned per epoch, channels_last output without a copy,
a pipeline per image size (progressive resizing), bad files met in training replaced or reported."""
import json
import shutil
import subprocess

import pytest
import torch

from tests.conftest import require, PY, SMOKE_CONFIG, subprocess_env
from train.config import DataConfig
from train.data import DataError, build_eval_loader, build_train_loader, list_dataset, train_plan

require("nvidia.dali")


def _cfg(root, **kw):
    base = dict(root=str(root), image_size=32, eval_resize=32, batch_size=4, workers=1, backend="dali")
    base.update(kw)
    return DataConfig(**base)


def test_pipeline_built_once_and_reshuffled_per_epoch(tiny_imagefolder):
    cfg = _cfg(tiny_imagefolder)
    split = list_dataset(cfg, ("train",)).splits["train"]
    loaders = [build_train_loader(cfg, split, 2, 1, seed=3, epoch=e) for e in range(3)]
    assert loaders[0]._passes is loaders[1]._passes is loaders[2]._passes
    pipe = loaders[0]._passes.pipe
    for e, loader in enumerate(loaders):
        seen = [i for _, idx in loader for i in idx.tolist()]
        assert seen == train_plan(len(split), 2, 4, 3, e)[1].tolist()
    assert loaders[0]._passes.pipe is pipe
    # a pass left early (the step budget ends mid-epoch) does not disturb the next one
    next(iter(build_train_loader(cfg, split, 2, 1, seed=3, epoch=3)))
    seen = [i for _, idx in build_train_loader(cfg, split, 2, 1, seed=3, epoch=4, start_step=1) for i in idx.tolist()]
    assert seen == train_plan(len(split), 2, 4, 3, 4)[1][4:].tolist()


def test_channels_last_is_nhwc_without_copy_and_equal_values(tiny_imagefolder):
    cfg = _cfg(tiny_imagefolder)
    split = list_dataset(cfg, ("val",)).splits["val"]
    nchw = torch.cat([x for x, _ in build_eval_loader(cfg, split, 1, 0)])
    x, _ = next(iter(build_eval_loader(cfg, split, 1, 0, channels_last=True)))
    assert x.shape == (4, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    assert x.permute(0, 2, 3, 1).is_contiguous()  # the pipeline's own NHWC buffer: no reorder happened
    nhwc = torch.cat([x for x, _ in build_eval_loader(cfg, split, 1, 0, channels_last=True)])
    assert torch.equal(nchw, nhwc)


def test_image_size_override_keeps_one_pipeline_per_size(tiny_imagefolder):
    cfg = _cfg(tiny_imagefolder)
    split = list_dataset(cfg, ("train",)).splits["train"]
    small = build_train_loader(cfg, split, 1, 0, 0, 0, image_size=16, channels_last=True)
    full = build_train_loader(cfg, split, 1, 0, 0, 0, channels_last=True)
    assert next(iter(small))[0].shape == (4, 3, 16, 16) and next(iter(full))[0].shape == (4, 3, 32, 32)
    assert build_train_loader(cfg, split, 1, 0, 0, 1, image_size=16, channels_last=True)._passes is small._passes
    assert small._passes is not full._passes


def test_bad_file_met_in_training_is_replaced_or_reported(tmp_path, tiny_imagefolder):
    root = tmp_path / "images"
    shutil.copytree(tiny_imagefolder, root)
    good = (root / "train" / "square" / "square_000.png").read_bytes()
    (root / "train" / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (root / "train" / "square" / "truncated.png").write_bytes(good[: len(good) // 2])
    split = list_dataset(_cfg(root), ("train",)).splits["train"]
    bad = {i for i, p in enumerate(split.paths) if p.endswith(("broken.png", "truncated.png"))}
    loader = build_train_loader(_cfg(root, on_corrupt="skip"), split, 1, 0, 0, 0)
    batches = list(loader)
    seen = [i for _, idx in batches for i in idx.tolist()]
    assert len(seen) == 48 and not bad & set(seen) and loader.substituted == 2
    assert all(x.shape == (4, 3, 32, 32) and torch.isfinite(x).all() for x, _ in batches)
    with pytest.raises(DataError, match=r"^1 unreadable image\(s\) met in training: .*data.on_corrupt=skip"):
        list(build_train_loader(_cfg(root, on_corrupt="fail"), split, 1, 0, 0, 0))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_training_run_meets_bad_files_unverified_and_finishes(tmp_path, tiny_imagefolder):
    """A real `python -m train` on DALI, data.verify off (the default): the broken files are met in training,
    replaced with a warning each, and the run ends with its report."""
    root = tmp_path / "images"
    shutil.copytree(tiny_imagefolder, root)
    good = (root / "train" / "square" / "square_000.png").read_bytes()
    (root / "train" / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (root / "train" / "square" / "truncated.png").write_bytes(good[: len(good) // 2])
    split = list_dataset(_cfg(root), ("train",)).splits["train"]
    plan = train_plan(len(split), 1, 25, 0, 0)[0]
    met = sum(split.paths[i].endswith(("broken.png", "truncated.png")) for i in plan)
    assert met >= 1  # the seeded plan holds at least one of them
    out = tmp_path / "run"
    args = [PY, "-m", "train", "--config", str(SMOKE_CONFIG), "--set", f"data.root={root}", "--set", f"output_dir={out}",
            "--set", "data.backend=dali", "--set", "data.on_corrupt=skip", "--set", "data.batch_size=25",
            "--set", "train.max_steps=2", "--set", "metrics.enabled=false"]
    r = subprocess.run(args, capture_output=True, text=True, env=subprocess_env(), timeout=280)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no decode check" in r.stderr and f"(data.on_corrupt=skip; {met} so far)" in r.stderr, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2 and report["data_backend"] == "dali"
