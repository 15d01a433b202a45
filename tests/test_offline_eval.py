"""`seresnet evaluate` (serve/offline_eval.py): a labelled folder scored from a checkpoint or an exported ONNX without a
server, through the serving eval transform; errors are not misses; report keys and provenance; the confusion plot
stays readable at 1,000 classes."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from tests.conftest import PY, ROOT, SHAPES, draw_sample, subprocess_env
from tests.serve_fixtures import CLASSES, make_checkpoint, reference_probabilities
from train.evaluate import most_confused, plot_confusion


def _folder(root, per_class: int = 3, seed: int = 0):
    """A labelled folder of real PNG/JPEG photos-like images named by the model's classes."""
    rng = np.random.default_rng(seed)
    for ci, c in enumerate(CLASSES):
        d = root / c
        d.mkdir(parents=True)
        for i in range(per_class):
            img = draw_sample(SHAPES[(ci + i) % len(SHAPES)], rng, size=48)
            img.save(d / f"{c}_{i}.{'jpg' if i % 2 else 'png'}")
    return root


def _expected_confusion(ckpt, folder):
    files = sorted((p, p.parent.name) for p in folder.glob("*/*"))
    probs, classes = reference_probabilities(ckpt, [p.read_bytes() for p, _ in files])
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for (_, c), pr in zip(files, probs):
        confusion[classes.index(c), int(pr.argmax())] += 1
    return confusion, probs


def _run(*args):
    return subprocess.run([PY, "-m", "serve.offline_eval", *map(str, args), "--no-progress", "--workers", "0"],
                          capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=300)


def test_checkpoint_scores_equal_the_eager_reference_and_report_has_serve_evaluate_keys(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    folder = _folder(tmp_path / "test")
    expected, _ = _expected_confusion(ckpt, folder)
    r = _run("--checkpoint", ckpt, "--data", folder, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert np.array_equal(np.array(report["confusion"]), expected)
    assert report["top1"] == report["test_top1"] == round(float(np.trace(expected)) / expected.sum(), 5)
    for key in ("top5", "per_class", "classes", "errors", "images", "test_top5", "test_images"):
        assert key in report
    assert report["classes"] == CLASSES and report["errors"] == 0 and report["images"] == len(CLASSES) * 3
    assert (tmp_path / "out" / "confusion.png").stat().st_size > 0
    prov = report["provenance"]
    assert len(prov["data_fingerprint"]) == 20 and prov["packages"]["torch"] and len(prov["config_fingerprint"]) == 20

    # relabelling one file changes the listing fingerprint; the same listing elsewhere gives the same one
    moved = tmp_path / "test" / CLASSES[1] / f"{CLASSES[0]}_0.png"
    (tmp_path / "test" / CLASSES[0] / f"{CLASSES[0]}_0.png").rename(moved)
    r2 = _run("--checkpoint", ckpt, "--data", folder, "--out", tmp_path / "out2")
    assert r2.returncode == 0, r2.stderr
    assert json.loads((tmp_path / "out2" / "report.json").read_text())["provenance"]["data_fingerprint"] != prov["data_fingerprint"]


def test_onnx_scores_through_the_export_folder_spec_and_a_broken_image_is_an_error_not_a_miss(tmp_path):
    pytest.importorskip("onnxruntime")
    from serve.export import export_onnx

    ckpt = make_checkpoint(tmp_path / "ckpt")
    folder = _folder(tmp_path / "test")
    expected, probs = _expected_confusion(ckpt, folder)
    export_onnx(ckpt, tmp_path / "export")
    (folder / CLASSES[2] / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    r = _run("--onnx", tmp_path / "export" / "model.onnx", "--data", folder, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["errors"] == 1 and report["failures"][0]["path"].endswith("broken.jpg")
    assert report["images"] == len(CLASSES) * 3 + 1 and report["scored"] == len(CLASSES) * 3
    got = np.array(report["confusion"])
    assert got.sum() == expected.sum()             # the broken file is in no row: not counted as a miss
    top2 = np.sort(probs, axis=1)[:, -2:]
    if (top2[:, 1] - top2[:, 0]).min() > 1e-3:     # ONNX parity is 1e-4: only a near-tie could flip a prediction
        assert np.array_equal(got, expected)
    assert report["runtime"].startswith("onnxruntime")


def test_bad_input_ends_in_one_sentence(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    folder = _folder(tmp_path / "test", per_class=1)
    (folder / "unicorn").mkdir()
    Image.new("RGB", (40, 40)).save(folder / "unicorn" / "u.png")
    r = _run("--checkpoint", ckpt, "--data", folder, "--out", tmp_path / "out")
    assert r.returncode == 2 and "unicorn" in r.stderr and "Traceback" not in r.stderr
    r = _run("--checkpoint", tmp_path / "nope.pt", "--data", folder, "--out", tmp_path / "out")
    assert r.returncode == 2 and "nope.pt" in r.stderr and "Traceback" not in r.stderr
    r = _run("--onnx", tmp_path / "nope.onnx", "--data", folder, "--out", tmp_path / "out")
    assert r.returncode == 2 and "nope.onnx" in r.stderr and "Traceback" not in r.stderr


def test_confusion_plot_at_1000_classes_shows_the_most_confused_and_stays_small(tmp_path):
    n = 1000
    confusion = np.diag(np.full(n, 50)).astype(np.int64)
    confusion[7, 900] = 20      # the classes with errors must be the ones drawn
    confusion[123, 7] = 9
    confusion[456, 457] = 3
    keep = most_confused(confusion)
    assert {7, 900, 123, 456, 457} <= set(keep.tolist()) and len(keep) == 30
    path = tmp_path / "c.png"
    plot_confusion(confusion, [f"class_{i}" for i in range(n)], path, "t")
    with Image.open(path) as im:
        assert max(im.size) < 3000, im.size   # 1,000 classes drawn in full would be ~72,000 px wide
