# Copied verbatim by serve.repository from train/transforms.py: the one eval transform. Do not edit.
"""The eval transform (defined once: training evaluation uses it, and the repository writer copies this file verbatim into Triton's preprocess model) and the torchvision train augmentation."""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms as T

if TYPE_CHECKING:   # annotations only: the serving copy of this file (serve/triton_runtime) imports nothing of ours
    from train.config import DataConfig

INTERPOLATION = T.InterpolationMode.BILINEAR
# Reduce on load (EvalSpec.reducing_gap, data.eval_reducing_gap): a large input is first shrunk by an integer
# factor, never below gap x the resize target, then resampled: a JPEG in its decoder (libjpeg's scaled IDCT, 1/2 to
# 1/8, Pillow's Image.draft), any image by a box filter (Pillow's Image.resize reducing_gap, as Image.thumbnail
# does). Inputs whose shorter side is under gap x the target are resized exactly as a one-pass resize would.


class ImageDecodeError(ValueError):
    """An input that is not a decodable image, or one over the size limits."""


@dataclass(frozen=True)
class EvalSpec:
    """Everything the eval transform needs; serialised into the Triton repository so serving cannot drift."""

    image_size: int
    eval_resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    reducing_gap: float | None = None   # None: one-pass resize (also what a spec written without the key meant)

    @classmethod
    def from_data_config(cls, data: DataConfig) -> "EvalSpec":
        return cls(data.image_size, data.eval_resize, tuple(data.mean), tuple(data.std), data.eval_reducing_gap)

    @classmethod
    def from_dict(cls, d: dict) -> "EvalSpec":
        gap = d.get("reducing_gap")
        return cls(int(d["image_size"]), int(d["eval_resize"]), tuple(float(v) for v in d["mean"]),
                   tuple(float(v) for v in d["std"]), None if gap is None else float(gap))

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "eval_resize": self.eval_resize, "mean": list(self.mean),
                "std": list(self.std), "reducing_gap": self.reducing_gap}


class ResizeShorter:
    """PIL image -> shorter side ``size`` (the longer one as torchvision's Resize(int) computes it), bilinear with
    antialiasing, after a box reduction of large inputs (``reducing_gap``); an image already at size is returned."""

    def __init__(self, size: int, reducing_gap: float | None = None):
        self.size, self.reducing_gap = size, reducing_gap

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.size * long / short)
        out = (self.size, new_long) if w <= h else (new_long, self.size)
        if out == (w, h):
            return img
        return img.resize(out, Image.BILINEAR, reducing_gap=self.reducing_gap)

    def __repr__(self) -> str:
        return f"ResizeShorter(size={self.size}, reducing_gap={self.reducing_gap})"


def draft_for_eval(img: Image.Image, spec: EvalSpec) -> None:
    """Before pixels are decoded: let a JPEG decode at 1/2, 1/4 or 1/8 scale while both sides stay >=
    reducing_gap x eval_resize (a no-op for other formats, for small JPEGs and without a reducing_gap)."""
    if spec.reducing_gap and img.format == "JPEG":
        t = math.ceil(spec.eval_resize * spec.reducing_gap)
        img.draft("RGB", (t, t))


def eval_transform(spec: EvalSpec) -> T.Compose:
    """PIL RGB image -> normalised float32 CHW tensor: resize shorter side, centre crop, normalise."""
    return T.Compose([
        ResizeShorter(spec.eval_resize, spec.reducing_gap),
        T.CenterCrop(spec.image_size),
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])


def train_transform(data: DataConfig) -> T.Compose:
    """The torchvision twin of the DALI training augmentation."""
    j = data.jitter
    return T.Compose([
        T.RandomResizedCrop(data.image_size, scale=(data.scale_min, 1.0), interpolation=INTERPOLATION, antialias=True),
        T.RandomHorizontalFlip(data.flip_p),
        T.ColorJitter(brightness=j, contrast=j, saturation=j),
        T.RandomRotation(data.rotate_deg, interpolation=INTERPOLATION),
        T.ToTensor(),
        T.Normalize(data.mean, data.std),
    ])


def decode_image(data: bytes, max_bytes: int | None = None, max_pixels: int | None = None,
                 spec: EvalSpec | None = None) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image, refusing empty, oversize, undecodable or truncated input.

    With ``spec`` (images bound for ``eval_transform(spec)``), a large JPEG decodes at reduced scale (draft_for_eval);
    the pixel limit still applies to the image's full size."""
    if not data:
        raise ImageDecodeError("empty input: expected encoded JPEG/PNG bytes")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageDecodeError(f"encoded image is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageDecodeError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
        if spec is not None:
            draft_for_eval(img, spec)
        img.load()  # raises on truncated data (PIL's LOAD_TRUNCATED_IMAGES stays False)
        return img.convert("RGB")
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not a decodable image (unrecognised format; {len(data)} bytes starting {data[:8]!r})") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"not a decodable image ({type(err).__name__}: {err})") from None


def load_eval_tensor(path, spec: EvalSpec) -> torch.Tensor:
    with open(path, "rb") as f:
        return eval_transform(spec)(decode_image(f.read(), spec=spec))
