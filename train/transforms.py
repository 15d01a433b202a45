"""The eval transform (defined once: training evaluation uses it, and the repository writer copies this file verbatim into Triton's preprocess model) and the torchvision train augmentation."""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms as T

if TYPE_CHECKING:   # annotations only: the serving copy of this file (serve/triton_runtime) imports nothing of ours
    from train.config import DataConfig

INTERPOLATION = T.InterpolationMode.BILINEAR


class ImageDecodeError(ValueError):
    """An input that is not a decodable image, or one over the size limits."""


@dataclass(frozen=True)
class EvalSpec:
    """Everything the eval transform needs; serialised into the Triton repository so serving cannot drift."""

    image_size: int
    eval_resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_data_config(cls, data: DataConfig) -> "EvalSpec":
        return cls(data.image_size, data.eval_resize, tuple(data.mean), tuple(data.std))


def eval_transform(spec: EvalSpec) -> T.Compose:
    """PIL RGB image -> normalised float32 CHW tensor: resize shorter side, centre crop, normalise."""
    return T.Compose([
        T.Resize(spec.eval_resize, interpolation=INTERPOLATION, antialias=True),
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


def decode_image(data: bytes, max_bytes: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image, refusing empty, oversize, undecodable or truncated input."""
    if not data:
        raise ImageDecodeError("empty input: expected encoded JPEG/PNG bytes")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageDecodeError(f"encoded image is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageDecodeError(f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}")
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
        return eval_transform(spec)(decode_image(f.read()))
