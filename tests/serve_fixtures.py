"""Shared helpers for the serving tests: a small untrained checkpoint, sample photos, a served repository."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scripts.samples import DEMO_CLASSES as CLASSES
from scripts.samples import SMALL_OVERRIDES  # noqa: F401


def make_checkpoint(directory: str | Path, overrides: list[str] | None = None, seed: int = 0) -> Path:
    """Random-weight SE-ResNet50 checkpoint (32 px small stem) with non-degenerate outputs; returns <dir>/last.pt."""
    from scripts.samples import random_checkpoint

    return random_checkpoint(directory, overrides, seed)


def reference_probabilities(checkpoint: Path, images: list[bytes]):
    """PyTorch eager softmax on the training eval transform's pixels: what every served answer must match."""
    from serve.export import WithSoftmax, eval_batch, load_checkpoint

    model, cfg, classes = load_checkpoint(checkpoint)
    with torch.inference_mode():
        return WithSoftmax(model).eval()(eval_batch(images, cfg)).numpy(), classes


def big_png(width: int, height: int) -> bytes:
    """A highly compressible PNG of width x height pixels (a decompression-bomb stand-in that is small on the wire)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def gif_bytes(size: int = 64) -> bytes:
    """A real GIF (a format Pillow decodes but the service refuses)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buf, format="GIF")
    return buf.getvalue()


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition (labels matched exactly, in any order); 0.0 when absent."""
    import re

    for line in text.splitlines():
        m = re.match(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if m:
            got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            if got == labels:
                return float(m.group(2))
    return 0.0


MAX_PIXELS = 1_000_000           # small decode limit: a 1100x1000 PNG stands in for a decompression bomb (Pillow's own is 89 Mpx)
MAX_REQUEST_BYTES = 3_000_000    # small per-request byte cap: two 1.6 MB rows exceed it


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """A real tritonserver: CPU repository of a random checkpoint (small limits). Imported by test modules, it is one
    server per importing module; registered once in tests/conftest.py (pytest_plugins) it would be one per session."""
    from serve.repository import write_model_repository
    from serve.images import sample_image_bytes
    from serve.server import TritonServer

    d = tmp_path_factory.mktemp("triton")
    ckpt = make_checkpoint(d / "ckpt", [f"serve.max_image_pixels={MAX_PIXELS}"])
    repo = write_model_repository(ckpt, d / "repo", "cpu", max_request_bytes=MAX_REQUEST_BYTES)
    images = sample_image_bytes()
    with TritonServer(repo, ready_timeout=240) as server:
        yield {"server": server, "ckpt": ckpt, "repo": repo, "images": images, "dir": d}


def model_stats(client, model: str) -> tuple[int, int]:
    """(executions, requests) of a model from Triton's statistics extension (proto3 JSON omits zeros). The python
    backend counts a request answered with an error response under `success` too, so requests = success + fail."""
    s = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    st = s.get("inference_stats", {})
    return int(s.get("execution_count", 0)), sum(int(st.get(k, {}).get("count", 0)) for k in ("success", "fail"))
