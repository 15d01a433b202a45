"""`make demo` end to end on a small subset (python -m scripts.demo --quick), plus its CLI contract."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _demo(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "scripts.demo", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_quick_demo_serves_the_test_split_through_triton(tmp_path):
    out, data = tmp_path / "demo", tmp_path / "animals"
    r = _demo("--quick", "--out", str(out), "--data", str(data))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for key in ("test_top1", "test_images", "train_seconds", "total_seconds", "serving", "model_repository",
                "trainer_test_top1", "test_recall", "latency_ms"):
        assert key in report, key
    test_files = sorted((data / "test").rglob("*.png"))
    assert report["serving"] == "triton" and report["protocol"] == "grpc"
    assert report["test_images"] == len(test_files) > 0 and report["failed_requests"] == 0
    confusion = report["test_confusion"]   # rows: true class, columns: predicted (served answers)
    diagonal = sum(confusion[i][i] for i in range(len(confusion)))
    assert report["test_top1"] == pytest.approx(diagonal / report["test_images"], abs=1e-5)
    assert report["test_top1"] == pytest.approx(report["test_correct"] / report["test_images"], abs=1e-5)
    assert sum(map(sum, report["test_confusion"])) == report["test_images"]
    assert set(report["test_recall"]) == set(report["classes"]) and len(report["classes"]) == 10
    assert {"p50", "p95", "p99"} <= set(report["latency_ms"])
    assert 0 < report["train_seconds"] <= report["total_seconds"]
    repo = Path(report["model_repository"])
    assert (repo / "classify" / "config.pbtxt").is_file() and (repo / "se_resnet50" / "1" / "model.onnx").is_file()
    assert (out / "served" / "confusion.png").stat().st_size > 0
    served = json.loads((out / "served" / "report.json").read_text())   # what `python -m serve evaluate` writes
    assert served["top1"] == report["test_top1"] and served["images"] == report["test_images"]
    assert report["precision"] in ("fp32", "bf16") and report["epochs"] > 0 and "cpu" in report
    assert report["train_images_per_second"] > 0 and "time_budget" in report
    # Measured through Triton: the server itself counted one successful `classify` request per test image.
    metrics = (out / "triton_metrics.txt").read_text()
    m = re.search(r'nv_inference_request_success\{model="classify",version="1"\} (\d+)', metrics)
    # (`serve evaluate` asks once more for the model's label order, hence >=)
    assert m and len(test_files) <= int(m.group(1)) <= len(test_files) + 2, metrics[:2000]
    trainer = json.loads((out / "train" / "report.json").read_text())
    assert trainer["test_images"] == len(test_files) and report["trainer_test_top1"] == trainer["test_top1"]
    assert "=== summary ===" in r.stdout and "test top-1 through Triton (gRPC)" in r.stdout


def test_help_describes_the_stages():
    r = _demo("--help", timeout=300)
    assert r.returncode == 0
    for words in ("animal-mnist==0.4", "duplicates removed", "launch local --nproc", "time_budget", "gRPC",
                  "report.json", "serve evaluate", "--quick", "--fresh", "resumes"):
        assert words in r.stdout, words


@pytest.mark.parametrize("args, says", [
    (["--config", "nope.yaml"], "does not exist"),
    (["--set", "train.epochz=3"], "Unknown config key"),
    (["--max-per-class", "-1"], "--max-per-class"),
])
def test_user_errors_end_in_one_sentence(args, says, tmp_path):
    r = _demo(*args, "--out", str(tmp_path / "o"), "--data", str(tmp_path / "d"), timeout=300)
    assert r.returncode == 2
    err = r.stderr.strip()
    assert err.startswith("error: ") and says in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
