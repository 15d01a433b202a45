"""Provenance (train/provenance.py) and the export's model card (serve/model_card.py): the commit of a checkout and
nothing for a folder inside someone else's repository; fingerprints that change with the data and config; an export
that carries both and a MODEL_CARD.md with the training run's figures."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import ROOT
from tests.serve_fixtures import CLASSES, make_checkpoint
from train.provenance import config_fingerprint, git_commit, listing_fingerprint, provenance


def test_git_commit_is_the_checkout_head_and_none_for_a_folder_that_is_not_a_work_tree_top(tmp_path):
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert git_commit(ROOT)["commit"] == head.stdout.strip()
    assert git_commit(ROOT / "train") is None        # inside a work tree but not its top: a package in a venv
    assert git_commit(tmp_path) is None


def test_fingerprints_follow_the_listing_and_the_config_not_their_order():
    a = [("train/cat/1.png", "cat"), ("train/dog/2.png", "dog")]
    assert listing_fingerprint(a) == listing_fingerprint(list(reversed(a)))
    assert listing_fingerprint(a) != listing_fingerprint([("train/cat/1.png", "dog"), ("train/dog/2.png", "dog")])
    assert listing_fingerprint(a) != listing_fingerprint(a[:1])
    assert config_fingerprint({"a": 1, "b": {"c": 2}}) == config_fingerprint({"b": {"c": 2}, "a": 1})
    assert config_fingerprint({"a": 1}) != config_fingerprint({"a": 2})
    record = provenance({"a": 1}, "f" * 20)
    assert record["packages"]["torch"] and record["config_fingerprint"] and record["data_fingerprint"] == "f" * 20


def test_export_records_provenance_and_writes_a_model_card_from_the_training_report(tmp_path):
    pytest.importorskip("onnx")
    from serve.export import export_onnx

    run = tmp_path / "run"
    ckpt = make_checkpoint(run / "checkpoints")
    (run / "report.json").write_text(json.dumps({
        "test_top1": 0.9731, "test_top5": 0.999, "test_images": 1117, "val_top1": 0.9776, "epochs": 11.2, "steps": 900,
        "precision": "bf16", "device": "cpu", "world_size": 2, "engine": "ddp",
        "test_recall": {c: 0.9 + i / 100 for i, c in enumerate(CLASSES)},
        "provenance": {"data_fingerprint": "d" * 20, "config_fingerprint": "c" * 20}}))
    report = export_onnx(ckpt, tmp_path / "export")
    saved = json.loads((tmp_path / "export" / "export_report.json").read_text())
    assert saved["provenance"]["data_fingerprint"] == "d" * 20
    assert saved["provenance"]["config_fingerprint"] == report["provenance"]["config_fingerprint"]
    assert "torch" in saved["provenance"]["packages"]
    card = (tmp_path / "export" / "MODEL_CARD.md").read_text()
    assert "97.31%" in card and "1117 images" in card and "d" * 20 in card
    assert all(f"`{c}`" in card for c in CLASSES)
    assert "`bear` 90.0%" in card                       # lowest per-class recall listed
    for section in ("## Intended use", "## Limits", "## Metrics"):
        assert section in card
