"""Listing without decoding: broken files pass a plain listing and are caught by data.verify, the decode check is
cached in a manifest keyed by the listing, the result pickles (rank 0 broadcasts it), and a broken image met in
training is replaced (on_corrupt=skip) or stops the run in one sentence (fail) on the torchvision path."""
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from train.config import DataConfig
from train.data import DataError, build_eval_loader, build_train_loader, list_dataset, train_plan
from train.transforms import EvalSpec, eval_transform, decode_image


def _cfg(root, **kw):
    base = dict(root=str(root), image_size=32, eval_resize=32, batch_size=4, workers=1, backend="torchvision")
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture
def broken(tmp_path, tiny_imagefolder):
    dst = tmp_path / "images"
    shutil.copytree(tiny_imagefolder, dst)
    good = (dst / "train" / "square" / "square_000.png").read_bytes()
    (dst / "train" / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (dst / "train" / "square" / "truncated.png").write_bytes(good[: len(good) // 2])
    (dst / "train" / "square" / "zero.jpg").write_bytes(b"")
    return dst


def test_listing_does_not_decode_and_verify_does(broken):
    # without verify, only the empty file (known from its size) is unreadable; the two broken files are listed
    with pytest.raises(DataError, match=r"1 unreadable image\(s\) in .*zero.jpg \(empty file\)"):
        list_dataset(_cfg(broken), ("train",))
    listed = list_dataset(_cfg(broken, on_corrupt="skip"), ("train",)).splits["train"]
    assert len(listed) == 50 and any(p.endswith("broken.png") for p in listed.paths)
    verified = list_dataset(_cfg(broken, on_corrupt="skip", verify=True), ("train",)).splits["train"]
    assert len(verified) == 48 and len(verified.skipped_corrupt) == 3
    ds = list_dataset(_cfg(broken, on_corrupt="skip"))
    back = pickle.loads(pickle.dumps(ds))  # what rank 0 broadcasts with dist.broadcast_object_list
    assert back.classes == ds.classes and back.splits["val"].paths == ds.splits["val"].paths
    np.testing.assert_array_equal(back.splits["train"].labels, ds.splits["train"].labels)


def test_decode_check_cached_in_manifest_keyed_by_listing(broken, tmp_path, caplog):
    cache = tmp_path / "cache"
    cfg = _cfg(broken, on_corrupt="skip", verify=True)
    first = list_dataset(cfg, ("train",), cache).splits["train"]
    assert len(list(cache.glob("listing-train-*.json"))) == 1
    with caplog.at_level("INFO", logger="train.listing"):
        again = list_dataset(cfg, ("train",), cache).splits["train"]
    assert "decode check reused from" in caplog.text
    assert again.paths == first.paths and again.skipped_corrupt == first.skipped_corrupt
    # a file rewritten (new size and mtime) changes the key: decoded again, the fix is seen
    good = broken / "train" / "square" / "square_001.png"
    shutil.copy(good, broken / "train" / "circle" / "broken.png")
    os.utime(broken / "train" / "circle" / "broken.png", ns=(1, 1))
    caplog.clear()
    with caplog.at_level("INFO", logger="train.listing"):
        fixed = list_dataset(cfg, ("train",), cache).splits["train"]
    assert "reused" not in caplog.text and len(fixed) == 49 and fixed.fingerprint != first.fingerprint


def test_torchvision_bad_file_met_in_training_is_replaced_or_reported(broken):
    split = list_dataset(_cfg(broken, on_corrupt="skip"), ("train",)).splits["train"]
    bad = {i for i, p in enumerate(split.paths) if p.endswith(("broken.png", "truncated.png"))}
    loader = build_train_loader(_cfg(broken, on_corrupt="skip"), split, 1, 0, seed=0, epoch=0)
    seen = [i for x, idx in loader for i in idx.tolist()]
    plan = train_plan(len(split), 1, 4, 0, 0)[0].tolist()
    assert len(seen) == len(plan) and not bad & set(seen) and loader.substituted == len(bad & set(plan))
    with pytest.raises(DataError, match=r"^Unreadable image met in training: .*(broken|truncated).png .*"
                                        r"data.on_corrupt=skip \(data.verify=true checks every image at start\).$"):
        list(build_train_loader(_cfg(broken, on_corrupt="fail", workers=1), split, 1, 0, seed=0, epoch=0))


def test_uint8_transfer_normalised_on_device_equals_totensor_normalize(tiny_imagefolder):
    cfg = _cfg(tiny_imagefolder, image_size=28, eval_resize=36)
    split = list_dataset(cfg, ("val",)).splits["val"]
    for channels_last in (False, True):
        got = torch.cat([x for x, _ in build_eval_loader(cfg, split, 1, 0, channels_last=channels_last)])
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        spec = EvalSpec.from_data_config(cfg)
        want = torch.stack([eval_transform(spec)(decode_image(open(p, "rb").read(), spec=spec)) for p in split.paths])
        assert torch.equal(got, want)  # bit-identical to ToTensor + Normalize on the worker


def test_listing_cached_per_folder_reused_until_a_class_folder_changes(tiny_imagefolder, tmp_path, monkeypatch):
    """An elastic restart reads the cached listing (no walk over the files); a file added to a class folder changes
    that folder's mtime and the next start lists again."""
    import train.listing

    root = tmp_path / "images"
    shutil.copytree(tiny_imagefolder, root)
    walked = []
    walk = train.listing._list_split
    monkeypatch.setattr(train.listing, "_list_split", lambda d, s, c: walked.append(s) or walk(d, s, c))
    cache = tmp_path / "cache"
    first = list_dataset(_cfg(root), cache_dir=cache)
    assert walked == ["train", "val", "test"] and len(list(cache.glob("dataset-*.json"))) == 1
    again = list_dataset(_cfg(root), cache_dir=cache)
    assert walked == ["train", "val", "test"], "the restart walked the folder again"
    assert again.classes == first.classes and again.splits["train"].paths == first.splits["train"].paths
    np.testing.assert_array_equal(again.splits["val"].labels, first.splits["val"].labels)
    assert again.splits["train"].fingerprint == first.splits["train"].fingerprint
    shutil.copy(root / "train" / "square" / "square_000.png", root / "train" / "square" / "square_new.png")
    os.utime(root / "train" / "square", ns=(1, 1))   # mtime granularity: make the change visible on any filesystem
    changed = list_dataset(_cfg(root), cache_dir=cache)
    assert walked[3:] == ["train", "val", "test"] and len(changed.splits["train"]) == len(first.splits["train"]) + 1
