"""Shared by the python models of a generated repository (copied next to each model.py; imports no project code).

Request guards of `preprocess` (formats by magic bytes, byte and pixel limits), labels, and the custom metrics.
"""
from __future__ import annotations

import json
import os

import numpy as np

from seresnet_contract import (CLASS_METRIC, CONFIDENCE_METRIC, NONFINITE_METRIC, REJECT_REASONS,
                               REJECTED_METRIC)

CONFIDENCE_BUCKETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
# Magic bytes of the two formats the service accepts (JPEG: SOI + marker; PNG: the 8-byte signature).
MAGIC = {"JPEG": b"\xff\xd8\xff", "PNG": b"\x89PNG\r\n\x1a\n"}


class Rejected(ValueError):
    """A request refused by the guards; ``reason`` labels the rejection counter."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def params(model_config: dict) -> dict:
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def read_labels(args: dict, cfg: dict) -> list[str]:
    """Class names from the label_filename of the model's first labelled output (the classification extension's file)."""
    for out in cfg.get("output", []):
        if out.get("label_filename"):
            with open(os.path.join(args["model_repository"], out["label_filename"])) as f:
                return [line.rstrip("\n") for line in f if line.strip()]
    return []


def read_json(args: dict, name: str) -> dict:
    with open(os.path.join(args["model_repository"], args["model_version"], name)) as f:
        return json.load(f)


def check_image_bytes(data: bytes, max_bytes: int) -> None:
    """The size limit first: an oversize body is refused for its size, whatever its first bytes are."""
    if len(data) > max_bytes:
        raise Rejected("image_bytes", f"encoded image is {len(data)} bytes, over the limit of {max_bytes}")


def image_format(data: bytes) -> str:
    """'JPEG' or 'PNG' from the magic bytes; anything else is rejected before a decoder sees it."""
    for fmt, magic in MAGIC.items():
        if data.startswith(magic):
            return fmt
    raise Rejected("format", f"unsupported image format ({len(data)} bytes starting {data[:8]!r}); "
                             "preprocess accepts JPEG and PNG only")


def check_request(images: np.ndarray, max_request_bytes: int) -> None:
    if images.ndim != 2 or images.shape[1] == 0:
        raise Rejected("shape", f"expected a batch of encoded images, shape [batch, bytes], got {list(images.shape)}")
    if images.nbytes > max_request_bytes:
        raise Rejected("request_bytes", f"request carries {images.nbytes} bytes of images, over the per-request limit "
                                        f"of {max_request_bytes}; send fewer or smaller images per request")


# The last marker of a complete file: JPEG end-of-image, PNG's IEND chunk type. Rows of a multi-image request are
# zero-padded to a common length, so the padding is stripped first.
TRAILER = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}


def check_without_decoding(data: bytes, max_bytes: int, max_pixels: int) -> None:
    """The guards of the DALI route: size, format, pixel count from the header, a complete file; no pixel decoded."""
    import io

    from PIL import Image, UnidentifiedImageError

    check_image_bytes(data, max_bytes)
    fmt = image_format(data)
    if TRAILER[fmt] not in data.rstrip(b"\0")[-4096:]:
        raise Rejected("decode", f"truncated {fmt} ({len(data)} bytes, no end marker); send the whole file")
    try:
        with Image.open(io.BytesIO(data)) as img:   # parses the header only
            w, h = img.size
    except Image.DecompressionBombError as err:   # Pillow's own guard, far above ours: still a pixel refusal
        raise Rejected("pixels", f"image over the pixel limit of {max_pixels} ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise Rejected("decode", f"not a decodable {fmt} ({type(err).__name__}: {err})") from None
    if w * h > max_pixels:
        raise Rejected("pixels", f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")


def rejection_reason(message: str) -> str:
    """The counter label of a decode_image refusal (its messages name the limit that was hit)."""
    if "pixels, over the limit" in message:
        return "pixels"
    if "bytes, over the limit" in message:
        return "image_bytes"
    return "decode"


class RejectionCounter:
    """`seresnet_preprocess_rejected_total{reason}`: client input refused by preprocess (never a server error)."""

    def __init__(self, pb_utils):
        self.family = pb_utils.MetricFamily(name=REJECTED_METRIC, description="Requests refused by preprocess (bad client input), by reason",
                                            kind=pb_utils.MetricFamily.COUNTER)
        # Every reason exists from the start at 0, so rate() sees the first rejection.
        self.counters = {r: self.family.Metric(labels={"reason": r}) for r in REJECT_REASONS}

    def count(self, reason: str) -> None:
        self.counters.get(reason, self.counters["decode"]).increment(1)


class PredictionMetrics:
    """Top-1 softmax probability histogram and predicted-class counter, labelled by model (and class).

    Rows with a non-finite probability (NaN input pixels give NaN scores) are counted apart and never observed:
    one NaN in a Prometheus histogram makes its _sum NaN for good."""

    def __init__(self, pb_utils, model: str, classes: list[str]):
        # The families must stay referenced as long as their metrics are used ("MetricFamily has been deleted").
        self.confidence_family = pb_utils.MetricFamily(
            name=CONFIDENCE_METRIC, description="Top-1 softmax probability of served predictions",
            kind=pb_utils.MetricFamily.HISTOGRAM)
        self.class_family = pb_utils.MetricFamily(
            name=CLASS_METRIC, description="Served predictions by top-1 class", kind=pb_utils.MetricFamily.COUNTER)
        self.nonfinite_family = pb_utils.MetricFamily(
            name=NONFINITE_METRIC, description="Served predictions with a NaN or infinite probability (kept out of the histogram)",
            kind=pb_utils.MetricFamily.COUNTER)
        self.confidence = self.confidence_family.Metric(labels={"model": model}, buckets=CONFIDENCE_BUCKETS)
        self.nonfinite = self.nonfinite_family.Metric(labels={"model": model})
        self.classes = list(classes)
        self.per_class = [self.class_family.Metric(labels={"model": model, "class": c}) for c in self.classes]

    def record(self, probabilities: np.ndarray) -> None:
        if probabilities.size == 0:
            return
        probabilities = probabilities.reshape(probabilities.shape[0], -1)
        finite = np.isfinite(probabilities).all(axis=1)
        if not finite.all():
            self.nonfinite.increment(int((~finite).sum()))
            probabilities = probabilities[finite]
            if probabilities.size == 0:
                return
        for idx, p in zip(probabilities.argmax(axis=1).tolist(), probabilities.max(axis=1).tolist()):
            self.confidence.observe(float(p))
            if 0 <= idx < len(self.per_class):
                self.per_class[idx].increment(1)
