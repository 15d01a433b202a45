"""scripts.prepare_animals: exact-duplicate removal before a stratified split, the marker, reuse and refusal."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts import prepare_animals as pa


def test_dedupe_keeps_first_copy_and_drops_conflicting_groups():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(10, 4, 4), dtype=np.uint8)
    labels = np.arange(10) % 3
    imgs[5] = imgs[1]
    labels[5] = labels[1]          # exact duplicate, same label: keep index 1 only
    imgs[7] = imgs[2]
    labels[7] = (labels[2] + 1) % 3  # same pixels, different label: ambiguous, drop both
    keep, dropped, conflicting = pa.dedupe(imgs, labels)
    assert dropped == 2 and conflicting == 1
    assert keep.tolist() == [0, 1, 3, 4, 6, 8, 9]


@pytest.mark.parametrize("n_per_class", [(97, 115, 112, 120), (7, 9, 11, 5)])
def test_stratified_split_is_a_partition_with_balanced_classes(n_per_class):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)])
    labels = labels[np.random.default_rng(1).permutation(len(labels))]
    parts = pa.stratified_split(labels, 0.115, 0.115, seed=0)
    allpos = np.concatenate(list(parts.values()))
    assert len(allpos) == len(labels) == len(set(allpos.tolist()))  # disjoint and complete
    n = len(labels)
    assert len(parts["test"]) == round(n * 0.115)
    assert len(parts["val"]) + len(parts["test"]) == round(n * 0.23)
    for split, frac in (("test", len(parts["test"]) / n), ("val", len(parts["val"]) / n)):
        for c, nc in enumerate(n_per_class):
            got = int((labels[parts[split]] == c).sum())
            assert abs(got - nc * frac) <= 1, (split, c, got, nc * frac)
    assert pa.stratified_split(labels, 0.115, 0.115, seed=0)["test"].tolist() == parts["test"].tolist()


def test_package_has_the_documented_duplicates():
    imgs, labels = pa.load_animals()
    assert imgs.shape == (10000, 28, 28) and sorted(set(labels.tolist())) == list(range(10))
    keep, dropped, conflicting = pa.dedupe(imgs, labels)
    assert dropped == 284 and conflicting == 0 and len(keep) == 9716


def _pixels_digest(path: Path) -> str:
    with Image.open(path) as im:
        return hashlib.sha1(np.asarray(im).tobytes()).hexdigest()


def test_prepare_writes_a_deduplicated_stratified_imagefolder_and_reuses_it(tmp_path):
    out = tmp_path / "animals"
    info = pa.prepare(out, max_per_class=60, log=lambda *_: None)
    assert info["splits"] == {"train": 462, "val": 69, "test": 69}
    seen: dict[str, str] = {}
    for split in pa.SPLITS:
        classes = sorted(p.name for p in (out / split).iterdir())
        assert classes == list(pa.CLASSES)
        counts = [len(list((out / split / c).glob("*.png"))) for c in classes]
        assert max(counts) - min(counts) <= 1, (split, counts)  # equal class sizes in, so within one image out
        for f in (out / split).rglob("*.png"):
            d = _pixels_digest(f)
            assert d not in seen, f"{f} duplicates {seen[d]}"  # no exact duplicate anywhere, across splits included
            seen[d] = str(f)
    marker = json.loads((out / pa.MARKER).read_text())
    assert marker["duplicates_removed"] == 284 and marker["counts"]["test"]["bear"] == 7

    stamp = (out / pa.MARKER).stat().st_mtime_ns
    again = pa.prepare(out, max_per_class=60, log=lambda *_: None)
    assert again == info and (out / pa.MARKER).stat().st_mtime_ns == stamp  # verified and reused

    next(iter((out / "test" / "cat").glob("*.png"))).unlink()  # damaged: the marker no longer matches
    assert pa.check_prepared(out) is None
    pa.prepare(out, max_per_class=60, log=lambda *_: None)
    assert pa.check_prepared(out) is not None


def test_prepare_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert pa.main(["--out", str(out), "--max-per-class", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--force" in err and len(err.splitlines()) == 1
    assert (out / "notes.txt").read_text() == "keep me"


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle code ran"))


def test_a_data_file_with_the_wrong_checksum_is_refused_before_unpickling(tmp_path, monkeypatch, capsys):
    """A tampered animal_data_version_3.gz (a pickle that would run code) is refused by its SHA-256: one sentence,
    nothing unpickled, nothing written."""
    import gzip
    import pickle

    data, labels = pa.package_files()
    evil = tmp_path / "pkg" / data.name
    evil.parent.mkdir()
    ran = tmp_path / "pwned.txt"
    with gzip.open(evil, "wb") as f:
        pickle.dump(_Payload(ran), f)
    monkeypatch.setattr(pa, "package_files", lambda: (evil, labels))
    out = tmp_path / "animals"
    assert pa.main(["--out", str(out), "--max-per-class", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: '{evil}' does not have the SHA-256 of the "
                                                         "animal-mnist==0.4 release"), err
    assert "so it was not unpickled" in err and err.endswith("(`make venv`).")
    assert not ran.exists(), "the pickle was never loaded"
    assert not out.exists()
    pa.verify_file(data)  # the installed release verifies
    pa.verify_file(labels)
