"""Against a real tritonserver (the `served` fixture, free ports on 127.0.0.1): anti-skew, protocol parity with PyTorch,
bad requests (alone and batched with good ones), rejection and NaN metrics, clients and their preflight checks."""
from __future__ import annotations

import io
import re
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from serve.errors import ServeError
from serve.model_config import PYTHON_MAX_BATCH
from tests.serve_fixtures import (CLASSES, MAX_REQUEST_BYTES, big_png, gif_bytes, metric_value, model_stats,
                                  reference_probabilities)

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _grpc(server):
    import tritonclient.grpc as g

    return g, g.InferenceServerClient(server.grpc_url)


def _http(server):
    import tritonclient.http as h

    return h, h.InferenceServerClient(server.http_url)


def _infer(mod, client, model, name, array, dtype, output="probabilities", k=0):
    inp = mod.InferInput(name, list(array.shape), dtype)
    inp.set_data_from_numpy(array)
    out = mod.InferRequestedOutput(output, class_count=k) if k else mod.InferRequestedOutput(output)
    return client.infer(model, [inp], outputs=[out]).as_numpy(output)


def test_preprocess_pixels_equal_training_eval_transform(served):
    """The anti-skew test: served pixels == the training eval transform's pixels for the same file."""
    from serve.export import load_checkpoint
    from train.transforms import EvalSpec, decode_image, eval_transform

    _, cfg, _ = load_checkpoint(served["ckpt"])
    spec = EvalSpec.from_data_config(cfg.data)
    tf = eval_transform(spec)
    g, client = _grpc(served["server"])
    for name, data in served["images"].items():
        got = _infer(g, client, "preprocess", "image", np.frombuffer(data, np.uint8)[None], "UINT8", output="pixels")
        want = tf(decode_image(data, spec=spec)).numpy()
        assert got.shape == (1, 3, 32, 32), name
        np.testing.assert_allclose(got[0], want, rtol=0, atol=1e-6, err_msg=name)
        assert float(np.abs(got).sum()) > 1.0


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_classifier_and_ensemble_match_pytorch(served, protocol):
    from serve.export import eval_batch, load_checkpoint

    mod, client = (_grpc if protocol == "grpc" else _http)(served["server"])
    images = list(served["images"].values())
    ref, classes = reference_probabilities(served["ckpt"], images)
    _, cfg, _ = load_checkpoint(served["ckpt"])
    pixels = eval_batch(images, cfg).numpy()
    # The bare classifier, raw probabilities for the whole batch in one request.
    probs = _infer(mod, client, "se_resnet50", "input", pixels, "FP32")
    np.testing.assert_allclose(probs, ref, atol=1e-4)
    for i, data in enumerate(images):
        arr = np.frombuffer(data, np.uint8)[None]
        ens = _infer(mod, client, "classify", "image", arr, "UINT8")
        np.testing.assert_allclose(ens[0], ref[i], atol=1e-4)
        top = _infer(mod, client, "classify", "image", arr, "UINT8", k=3)[0]
        score, index, label = top[0].decode().split(":")
        assert int(index) == int(ref[i].argmax()) and label == classes[int(index)]
        assert abs(float(score) - float(ref[i].max())) < 1e-4
        assert all(e.decode().split(":")[2] in CLASSES for e in top)


def test_batched_ensemble_request_with_padded_rows(served):
    g, client = _grpc(served["server"])
    images = list(served["images"].values())[:3]
    width = max(len(b) for b in images)
    batch = np.zeros((3, width), np.uint8)
    for i, b in enumerate(images):
        batch[i, :len(b)] = np.frombuffer(b, np.uint8)
    ref, _ = reference_probabilities(served["ckpt"], images)
    np.testing.assert_allclose(_infer(g, client, "classify", "image", batch, "UINT8"), ref, atol=1e-4)


def _truncated_jpeg(images):
    data = next(b for n, b in images.items() if n.endswith(".jpg"))
    return data[: len(data) // 2]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_requests_fail_alone_with_clear_4xx(served, protocol):
    from tritonclient.utils import InferenceServerException

    server, images = served["server"], served["images"]
    mod, client = (_grpc if protocol == "grpc" else _http)(server)
    u8 = lambda b: np.frombuffer(b, np.uint8)[None]  # noqa: E731
    cases = {
        "not an image": (u8(b"this is certainly not a JPEG file" * 10), "UINT8", "preprocess accepts JPEG and PNG only"),
        "gif (decodable, not accepted)": (u8(gif_bytes()), "UINT8", "preprocess accepts JPEG and PNG only"),
        "jpeg magic, no image": (u8(b"\xff\xd8\xff" + bytes(2000)), "UINT8", "not a decodable image"),
        "truncated jpeg": (u8(_truncated_jpeg(images)), "UINT8", "not a decodable image"),
        # Our limit (1 Mpx here), far below Pillow's 89 Mpx: the message is ours.
        "decompression bomb": (u8(big_png(1100, 1000)), "UINT8", "1100x1000 = 1100000 pixels, over the limit of 1000000"),
        "request over the byte cap": (np.zeros((2, 1_600_000), np.uint8), "UINT8", f"over the per-request limit of {MAX_REQUEST_BYTES}"),
        "wrong dtype": (np.zeros((1, 100), np.float32), "FP32", "data-type"),
        "wrong shape": (np.zeros((1, 4, 5), np.uint8), "UINT8", "shape"),
        "batch over max": (np.zeros((PYTHON_MAX_BATCH + 1, 100), np.uint8), "UINT8",
                           f"batch-size must be <= {PYTHON_MAX_BATCH}"),
    }
    good = u8(images["chelsea.jpg"])
    ref, _ = reference_probabilities(served["ckpt"], [images["chelsea.jpg"]])
    good_results = []

    def send_good():
        _, c = (_grpc if protocol == "grpc" else _http)(server)
        good_results.append(_infer(mod, c, "classify", "image", good, "UINT8"))

    for what, (arr, dtype, needle) in cases.items():
        t = threading.Thread(target=send_good)
        t.start()  # a good request alongside each bad one still succeeds
        with pytest.raises(InferenceServerException) as info:
            _infer(mod, client, "classify", "image", arr, dtype)
        t.join(60)
        err = info.value
        status = str(err.status())
        assert status in ("400", "StatusCode.INVALID_ARGUMENT"), (what, status, str(err))
        assert needle.lower() in str(err).lower(), (what, str(err))
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("classify")
    assert len(good_results) == len(cases)
    for r in good_results:
        np.testing.assert_allclose(r[0], ref[0], atol=1e-4)


def test_client_classify_files_grpc_and_http(served, tmp_path):
    from serve.client import classify_files
    from scripts.samples import write_sample_images

    server = served["server"]
    files = write_sample_images(tmp_path / "imgs")
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    ref, classes = reference_probabilities(served["ckpt"], [p.read_bytes() for p in files])
    for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
        results = {Path(r.path).name: r for r in classify_files([tmp_path / "imgs"], url, protocol, k=2, concurrency=4)}
        assert set(results) == {p.name for p in files} | {"broken.jpg"}
        bad = results.pop("broken.jpg")
        assert not bad.ok and "not a decodable image" in bad.error and bad.attempts == 1  # a 4xx is never retried
        for i, p in enumerate(files):
            r = results[p.name]
            assert r.ok and len(r.top) == 2 and r.top[0].label == classes[int(ref[i].argmax())], (p, r)
            assert r.latency_ms > 0 and r.top[0].score >= r.top[1].score


def test_classify_cli(served, tmp_path):
    from scripts.samples import write_sample_images

    files = write_sample_images(tmp_path / "imgs")
    proc = subprocess.run([sys.executable, "-m", "serve", "classify", "--url", served["server"].grpc_url, "-k", "2",
                           "--no-progress", "--json", str(tmp_path / "out.json"), str(tmp_path / "imgs")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(files) and all(re.search(r"\t(\w+) 0\.\d{3}  (\w+) 0\.\d{3}\t\(", l) for l in lines), proc.stdout


def test_metrics_after_traffic(served):
    from serve.client import TritonClassifier

    clf = TritonClassifier(served["server"].grpc_url, "grpc")  # its own traffic: the test passes run alone
    for name, data in list(served["images"].items())[:3]:
        assert clf.classify_bytes(data, name=name).ok
    text = urllib.request.urlopen(served["server"].metrics_url, timeout=10).read().decode()
    for model in ("classify", "preprocess", "se_resnet50"):
        m = re.search(rf'nv_inference_request_success\{{model="{model}",version="1"\}} (\d+)', text)
        assert m and int(m.group(1)) > 0, model
    count = re.search(r'seresnet_prediction_confidence_count\{model="se_resnet50"\} (\d+)', text)
    assert count and int(count.group(1)) > 0
    assert 'seresnet_prediction_confidence_bucket{model="se_resnet50",le="0.5"}' in text
    per_class = [int(float(v)) for v in re.findall(r'seresnet_predicted_class_total\{class="\w+",model="se_resnet50"\} ([\d.]+)', text)]
    assert len(per_class) == len(CLASSES) and sum(per_class) == int(count.group(1))


def test_client_gives_a_final_error_when_no_server():
    from serve.client import TritonClassifier
    from serve.server import free_port

    clf = TritonClassifier(f"127.0.0.1:{free_port()}", "grpc", max_attempts=3, max_retry_seconds=10)
    r = clf.classify_bytes(b"\xff\xd8", name="x.jpg")
    assert not r.ok and r.attempts == 3 and r.error


def test_client_survives_server_restart(served, tmp_path):
    """Requests sent while the server is down are retried with backoff and answered once it is back."""
    import shutil

    from serve.server import TritonServer

    repo = tmp_path / "repo"
    shutil.copytree(served["repo"], repo, ignore=shutil.ignore_patterns("se_resnet50", "classify"))
    # A preprocess-only repository starts quickly; the client asks `preprocess` for pixels via its retry loop.
    first = TritonServer(repo).start()
    port = first.grpc_port
    first.stop()
    second = TritonServer(repo, grpc_port=port)
    from serve.client import retrying

    data = np.frombuffer(served["images"]["chelsea.jpg"], np.uint8)[None]
    result = {}

    def call():
        import tritonclient.grpc as g

        for attempt in retrying(30, 120):
            with attempt:
                result["attempts"] = attempt.retry_state.attempt_number
                c = g.InferenceServerClient(f"127.0.0.1:{port}")
                result["pixels"] = _infer(g, c, "preprocess", "image", data, "UINT8", output="pixels")

    t = threading.Thread(target=call)
    t.start()
    try:
        second.start()
        t.join(120)
    finally:
        second.stop()
    assert result.get("attempts", 0) > 1 and result["pixels"].shape == (1, 3, 32, 32)


def test_dead_python_stub_fails_fast_with_clear_message(tmp_path):
    from serve.server import TritonServer

    d = tmp_path / "repo" / "broken" / "1"
    d.mkdir(parents=True)
    (d / "model.py").write_text("import module_that_does_not_exist\n")
    (d.parent / "config.pbtxt").write_text(
        'name: "broken"\nbackend: "python"\nmax_batch_size: 1\n'
        'input { name: "x" data_type: TYPE_FP32 dims: 1 }\noutput { name: "y" data_type: TYPE_FP32 dims: 1 }\n')
    with pytest.raises(ServeError, match="could not load a model|exited with code") as info:
        TritonServer(tmp_path / "repo", ready_timeout=90).start()
    assert "module_that_does_not_exist" in str(info.value)


def test_bad_request_batched_with_good_ones_fails_alone(served):
    """A full preprocess batch of requests of the same byte length (so Triton may batch them) sent at once, one bad:
    when they meet in ONE preprocess execution (statistics prove it), the bad one fails with its 4xx and the good ones
    are answered."""
    import tritonclient.grpc as g
    from tritonclient.utils import InferenceServerException

    server, good = served["server"], served["images"]["chelsea.jpg"]
    ref, _ = reference_probabilities(served["ckpt"], [good])
    bads = {"format": bytes(np.random.default_rng(0).integers(0, 256, len(good), dtype=np.uint8)[1:].tobytes() + b"x"),
            "decode": b"\xff\xd8\xff" + bytes(len(good) - 3)}
    stats_client = g.InferenceServerClient(server.grpc_url)
    n = PYTHON_MAX_BATCH   # the python preprocess's max batch (bounded for its shared memory)
    clients = [g.InferenceServerClient(server.grpc_url) for _ in range(n)]
    for kind, bad in bads.items():
        assert len(bad) == len(good)
        rounds = []
        for _ in range(15):
            payloads, results, barrier = [bad] + [good] * (n - 1), [None] * n, threading.Barrier(n)

            def send(i):
                barrier.wait()
                try:
                    results[i] = _infer(g, clients[i], "classify", "image", np.frombuffer(payloads[i], np.uint8)[None], "UINT8")
                except InferenceServerException as err:
                    results[i] = err

            before = model_stats(stats_client, "preprocess")
            threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            after = model_stats(stats_client, "preprocess")
            err = results[0]
            assert isinstance(err, InferenceServerException) and str(err.status()) == "StatusCode.INVALID_ARGUMENT", (kind, err)
            assert ("accepts JPEG and PNG only" if kind == "format" else "not a decodable image") in str(err)
            for r in results[1:]:
                assert not isinstance(r, Exception), (kind, r)
                np.testing.assert_allclose(r[0], ref[0], atol=1e-4)
            rounds.append((after[0] - before[0], after[1] - before[1]))
            if rounds[-1] == (1, n):  # n requests, one execution: all were in one batch
                break
        assert rounds[-1] == (1, n), (kind, "(executions, requests) per round", rounds)
        print(f"\n{kind}: batched with {n - 1} good requests in round {len(rounds)}: {rounds}")


def test_rejections_are_counted_by_reason(served):
    """Client input refused by preprocess lands in seresnet_preprocess_rejected_total{reason} (never a server-error metric)."""
    from tritonclient.utils import InferenceServerException

    from serve.contract import REJECTED_METRIC

    server = served["server"]
    g, client = _grpc(server)
    u8 = lambda b: np.frombuffer(b, np.uint8)[None]  # noqa: E731
    sent = {"format": u8(gif_bytes()), "decode": u8(b"\xff\xd8\xff" + bytes(500)), "pixels": u8(big_png(1100, 1000)),
            "request_bytes": np.zeros((2, 1_600_000), np.uint8), "shape": np.zeros((1, 0), np.uint8)}
    before = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for reason, arr in sent.items():
        with pytest.raises(InferenceServerException):
            _infer(g, client, "classify", "image", arr, "UINT8")
    after = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for reason in sent:
        delta = metric_value(after, REJECTED_METRIC, reason=reason) - metric_value(before, REJECTED_METRIC, reason=reason)
        assert delta == 1, (reason, delta)
    assert metric_value(after, REJECTED_METRIC, reason="image_bytes") == metric_value(before, REJECTED_METRIC, reason="image_bytes")


def test_nan_input_never_poisons_the_confidence_histogram(served):
    import math

    from serve.contract import CONFIDENCE_METRIC, NONFINITE_METRIC
    from serve.export import eval_batch, load_checkpoint

    server = served["server"]
    g, client = _grpc(server)
    _, cfg, _ = load_checkpoint(served["ckpt"])
    good = eval_batch([served["images"]["chelsea.jpg"]], cfg).numpy()
    batch = np.concatenate([good, np.full_like(good, np.nan)])
    scrape = lambda: urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()  # noqa: E731
    before = scrape()
    probs = _infer(g, client, "se_resnet50", "input", batch, "FP32")
    assert np.isfinite(probs[0]).all() and np.isnan(probs[1]).all()
    after = scrape()
    m = {"model": "se_resnet50"}
    assert metric_value(after, f"{CONFIDENCE_METRIC}_count", **m) - metric_value(before, f"{CONFIDENCE_METRIC}_count", **m) == 1
    assert metric_value(after, NONFINITE_METRIC, **m) - metric_value(before, NONFINITE_METRIC, **m) == 1
    total = metric_value(after, f"{CONFIDENCE_METRIC}_sum", **m)
    assert math.isfinite(total) and abs(total - metric_value(before, f"{CONFIDENCE_METRIC}_sum", **m) - float(probs[0].max())) < 1e-4
