"""Data: scanning and its clear errors, class weights, sample plans, DALI vs torchvision eval parity."""
import shutil

import numpy as np
import pytest
import torch

from tests.conftest import require, make_imagefolder
from train.config import DataConfig
from train.data import (DataError, build_eval_loader, build_train_loader, class_weights, eval_shard, scan_imagefolder,
                        train_plan)
from train.transforms import EvalSpec, eval_transform, load_eval_tensor


def _cfg(root, **kw):
    base = dict(root=str(root), image_size=32, eval_resize=36, batch_size=4, workers=1)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture
def folder(tmp_path, tiny_imagefolder):
    dst = tmp_path / "images"
    shutil.copytree(tiny_imagefolder, dst)
    return dst


def test_scan_finds_classes_and_splits(tiny_imagefolder):
    ds = scan_imagefolder(_cfg(tiny_imagefolder))
    assert ds.classes == ["circle", "square", "triangle"]
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 48, "val": 18, "test": 18}


def test_corrupt_image_fail_and_skip(folder):
    (folder / "train" / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    good = (folder / "train" / "square" / "square_000.png").read_bytes()
    (folder / "train" / "square" / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "train" / "square" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"2 unreadable image\(s\) in .*broken.png.*truncated.png.*data.on_corrupt=skip"):
        scan_imagefolder(_cfg(folder, verify=True))
    ds = scan_imagefolder(_cfg(folder, on_corrupt="skip", verify=True))
    assert len(ds.splits["train"]) == 48 and len(ds.splits["train"].skipped_corrupt) == 2
    assert ds.splits["train"].skipped_non_image == 1


def test_empty_class_and_class_mismatch(folder):
    (folder / "train" / "hexagon").mkdir()
    with pytest.raises(DataError, match="Class folder .*hexagon' has no images"):
        scan_imagefolder(_cfg(folder))
    (folder / "train" / "hexagon").rmdir()
    (folder / "val" / "star").mkdir()
    shutil.copy(folder / "val" / "circle" / "circle_000.png", folder / "val" / "star" / "x.png")
    with pytest.raises(DataError, match=r"class folders not in train/: \['star'\]"):
        scan_imagefolder(_cfg(folder))


def test_missing_split(folder, caplog):
    shutil.rmtree(folder / "test")  # optional (ImageNet has train/ and val/ only): left out, with a log line
    with caplog.at_level("INFO", logger="train.listing"):
        assert set(scan_imagefolder(_cfg(folder)).splits) == {"train", "val"}
    assert "no test/ split in" in caplog.text
    shutil.rmtree(folder / "val")
    with pytest.raises(DataError, match="Split folder .*val' does not exist"):
        scan_imagefolder(_cfg(folder))


def test_class_weights_inverse_frequency():
    w = class_weights(np.array([10, 30, 60]))
    assert torch.allclose(w.mean(), torch.tensor(1.0))
    assert w[0] > w[1] > w[2]
    assert torch.allclose(w[0] / w[2], torch.tensor(6.0))


def test_train_plan_disjoint_and_deterministic():
    p = train_plan(103, world=2, batch=4, seed=1, epoch=3)
    assert p.shape == (2, 48)
    assert not set(p[0]) & set(p[1])
    np.testing.assert_array_equal(p, train_plan(103, 2, 4, 1, 3))
    assert not np.array_equal(p, train_plan(103, 2, 4, 1, 4))
    assert sorted(np.concatenate([eval_shard(10, 3, r) for r in range(3)])) == list(range(10))


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_train_loader_resumes_mid_epoch(tiny_imagefolder, backend):
    if backend == "dali":
        require("nvidia.dali")
    cfg = _cfg(tiny_imagefolder, backend=backend)
    split = scan_imagefolder(cfg, ("train",)).splits["train"]
    full = [i for _, idx in build_train_loader(cfg, split, 2, 1, seed=0, epoch=0) for i in idx.tolist()]
    rest = [i for _, idx in build_train_loader(cfg, split, 2, 1, seed=0, epoch=0, start_step=2) for i in idx.tolist()]
    assert full[8:] == rest and len(full) == 24


def _images_for_parity(root):
    """Square and non-square PNGs and JPEGs of different sizes (real photos from scikit-image)."""
    from PIL import Image
    from skimage import data as skdata
    out = []
    for name, arr in (("chelsea", skdata.chelsea()), ("coffee", skdata.coffee()), ("astronaut", skdata.astronaut())):
        img = Image.fromarray(arr)
        for ext in ("png", "jpg"):
            p = root / "test" / "photo" / f"{name}.{ext}"
            p.parent.mkdir(parents=True, exist_ok=True)
            img.save(p, quality=95) if ext == "jpg" else img.save(p)
            out.append(p)
    return out


def test_dali_and_torchvision_eval_pipelines_agree(tmp_path):
    """Stated tolerance: every pixel within one 8-bit level (1/255/std in normalised units), mean |diff| < 0.005.
    Same output sizes as torchvision (shorter side -> eval_resize, longer side truncated), same centre crop."""
    require("nvidia.dali")
    from train.dali import dali_eval_passes

    files = _images_for_parity(tmp_path)
    cfg = _cfg(tmp_path, image_size=224, eval_resize=256, batch_size=len(files))
    (images, _), = dali_eval_passes(cfg, [str(f) for f in files], None).passes(np.arange(len(files)))
    dali = images.numpy()
    spec = EvalSpec.from_data_config(cfg)
    tv = np.stack([load_eval_tensor(f, spec).numpy() for f in files])
    assert dali.shape == tv.shape == (len(files), 3, 224, 224)
    diff = np.abs(dali - tv)
    one_level = 1 / 255 / min(cfg.std) + 1e-5
    assert diff.max() <= one_level, diff.max()
    assert diff.mean() < 0.005, diff.mean()


def test_dali_eval_loader_matches_torchvision_on_small_pngs(tiny_imagefolder):
    require("nvidia.dali")
    cfg_d = _cfg(tiny_imagefolder, image_size=32, eval_resize=32, backend="dali")
    cfg_t = _cfg(tiny_imagefolder, image_size=32, eval_resize=32, backend="torchvision")
    split = scan_imagefolder(cfg_d, ("val",)).splits["val"]
    d = torch.cat([x for x, _ in build_eval_loader(cfg_d, split, 1, 0)])
    t = torch.cat([x for x, _ in build_eval_loader(cfg_t, split, 1, 0)])
    # 40 px -> 32 px downscale: the two antialias filters differ at the borders by a few 8-bit levels
    level = 1 / 255 / min(cfg_d.std)
    diff = (d - t).abs()
    assert diff.mean() <= 0.5 * level, diff.mean() / level
    assert diff.max() <= 6 * level, diff.max() / level


def test_eval_transform_is_the_single_definition():
    spec = EvalSpec(32, 36, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    names = [type(t).__name__ for t in eval_transform(spec).transforms]
    assert names == ["ResizeShorter", "CenterCrop", "ToTensor", "Normalize"]
