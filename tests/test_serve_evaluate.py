"""`serve evaluate` / serve.evaluate.evaluate_folder against the real tritonserver (the session's server): the scores
equal what PyTorch's probabilities imply for a labelled folder, and the CLI writes report.json and the confusion PNG.
The clients' preflight (server reachable, model takes images, k in range) that evaluate and classify share."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serve.errors import ServeError
from tests.serve_fixtures import model_stats, reference_probabilities

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def labelled(served, tmp_path_factory):
    """An ImageFolder of the sample photos: each under the class PyTorch predicts for it, two also under a wrong
    class (their 2nd and 7th ranked). Expected top-1, top-5 and per-class recall follow from the reference."""
    images = served["images"]
    ref, classes = reference_probabilities(served["ckpt"], list(images.values()))
    root = tmp_path_factory.mktemp("labelled")
    truth = []  # (class index, reference row)
    for i, (name, data) in enumerate(images.items()):
        order = np.argsort(-ref[i])
        for rank in ((0, 1) if i == 0 else (0, 6) if i == 1 else (0,)):
            c = classes[int(order[rank])]
            (root / c).mkdir(exist_ok=True)
            (root / c / f"r{rank}_{name}").write_bytes(data)
            truth.append((int(order[rank]), ref[i]))
    top1 = sum(int(row.argmax()) == c for c, row in truth) / len(truth)
    top5 = sum(c in np.argsort(-row)[:5] for c, row in truth) / len(truth)
    return {"root": root, "classes": classes, "truth": truth, "top1": top1, "top5": top5}


def test_evaluate_folder_scores_match_pytorch(served, labelled, tmp_path):
    from serve.evaluate import evaluate_folder

    r = evaluate_folder(served["server"].grpc_url, labelled["root"], "grpc", tmp_path / "out", progress=False, concurrency=4)
    n = len(labelled["truth"])
    assert r["images"] == n == 10 and r["errors"] == 0 and r["classes"] == labelled["classes"]
    assert r["top1"] == pytest.approx(labelled["top1"]) and labelled["top1"] == 0.8
    assert r["top5"] == pytest.approx(labelled["top5"]) and r["top5_k"] == 5
    conf = np.array(r["confusion"])
    assert conf.sum() == n and np.trace(conf) == 8
    for c, row in labelled["truth"]:
        assert r["per_class"][labelled["classes"][c]]["support"] == sum(t == c for t, _ in labelled["truth"])
    lat = r["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["top1"] == r["top1"] and saved["confusion"] == r["confusion"]
    assert (tmp_path / "out" / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_cli_over_http_and_unknown_class(served, labelled, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "serve", "evaluate", "--url", served["server"].http_url, "--protocol", "http",
                           "--no-progress", "--out", str(tmp_path / "cli"), str(labelled["root"])],
                          capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "top-1 80.00%" in proc.stdout and "p50" in proc.stdout and "p99" in proc.stdout and "per-class recall" in proc.stdout
    assert json.loads((tmp_path / "cli" / "report.json").read_text())["protocol"] == "http"
    from serve.evaluate import evaluate_folder

    odd = tmp_path / "odd" / "unicorn"
    odd.mkdir(parents=True)
    (odd / "x.jpg").write_bytes(served["images"]["chelsea.jpg"])
    with pytest.raises(ServeError, match="folder classes unicorn are not among the model's classes"):
        evaluate_folder(served["server"].grpc_url, tmp_path / "odd", progress=False)


def test_classify_checks_server_model_and_k_before_sending(served, tmp_path, capsys):
    import tritonclient.grpc as g

    from serve.__main__ import main
    from scripts.samples import write_sample_images
    from serve.server import free_port

    server = served["server"]
    write_sample_images(tmp_path / "imgs")
    client = g.InferenceServerClient(server.grpc_url)
    before = model_stats(client, "classify")
    cases = [
        (["--url", server.grpc_url, "-k", "11"], "-k 11 is out of range: model 'classify' has 10 classes; pass -k between 1 and 10."),
        (["--url", server.http_url, "--protocol", "http", "-k", "0"], "-k 0 is out of range"),
        (["--url", server.grpc_url, "--model", "se_resnet50"], "model 'se_resnet50' takes input FP32, not encoded images"),
        (["--url", server.http_url, "--protocol", "http", "--model", "nope"], "model 'nope' is not ready"),
        (["--url", f"127.0.0.1:{free_port()}", "--max-attempts", "2"], "cannot reach a Triton server at 127.0.0.1:"),
    ]
    for args, needle in cases:
        rc = main(["classify", "--no-progress", *args, str(tmp_path / "imgs")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and needle in err and len(err.splitlines()) == 1, (args, err)
    assert model_stats(client, "classify") == before  # refused before any image was sent
