"""The eval transform's reduce-on-load (train/transforms.py): large JPEGs decode at reduced scale, large images are
box-reduced before the resize; small inputs come out exactly as a one-pass torchvision resize; the trainer's
evaluation loader and serving's decode give the same pixels; the Triton preprocess copy runs the same code."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from torchvision import transforms as T

from train.config import DataConfig
from train.data import build_eval_loader, scan_imagefolder
from train.transforms import EvalSpec, decode_image, eval_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GAP = DataConfig().eval_reducing_gap   # the default: 3.0


def one_pass(spec: EvalSpec) -> T.Compose:
    return T.Compose([T.Resize(spec.eval_resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                      T.CenterCrop(spec.image_size), T.ToTensor(), T.Normalize(spec.mean, spec.std)])


def encoded(side: tuple[int, int], fmt: str) -> bytes:
    img = Image.fromarray(skdata.astronaut()).resize(side, Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def grey_levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs() * torch.tensor(STD).view(3, 1, 1) * 255


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("side", [(28, 28), (40, 30), (63, 90)])
def test_inputs_under_twice_the_target_are_resized_exactly_as_before(fmt, side):
    """Every image of the demo data (28 px) and anything under reducing_gap x eval_resize: bit-identical pixels."""
    spec = EvalSpec(32, 32, MEAN, STD, GAP)
    b = encoded(side, fmt)
    assert GAP == 3.0 and min(side) < GAP * spec.eval_resize
    assert torch.equal(eval_transform(spec)(decode_image(b, spec=spec)), one_pass(spec)(decode_image(b)))


@pytest.mark.parametrize("fmt,max_grey,mean_grey", [("JPEG", 20, 1.5), ("PNG", 16, 1.0)])
def test_large_inputs_are_reduced_on_load_within_a_few_grey_levels(fmt, max_grey, mean_grey):
    spec = EvalSpec(32, 32, MEAN, STD, GAP)
    b = encoded((1000, 750), fmt)
    img = decode_image(b, spec=spec)
    if fmt == "JPEG":   # decoded at 1/4 scale in the DCT domain: both sides still >= 3 x eval_resize
        assert img.size == (250, 188) and min(img.size) >= GAP * spec.eval_resize
    else:               # PNG decodes in full; the box reduction happens in the resize
        assert img.size == (1000, 750)
    diff = grey_levels(eval_transform(spec)(img), one_pass(spec)(decode_image(b)))
    assert diff.max() <= max_grey and diff.mean() <= mean_grey, (float(diff.max()), float(diff.mean()))
    assert diff.max() > 0   # it did take the reduced path
    # data.eval_reducing_gap: null -> the one-pass resize, bit for bit
    off = EvalSpec(32, 32, MEAN, STD, None)
    assert torch.equal(eval_transform(off)(decode_image(b, spec=off)), one_pass(spec)(decode_image(b)))


def test_the_pixel_limit_counts_the_full_image_not_the_draft():
    spec = EvalSpec(32, 32, MEAN, STD, GAP)
    with pytest.raises(ValueError, match="1000x750 = 750000 pixels, over the limit of 700000"):
        decode_image(encoded((1000, 750), "JPEG"), max_pixels=700_000, spec=spec)


def test_trainer_evaluation_and_serving_decode_give_the_same_pixels(tmp_path):
    """Large JPEGs and PNGs in a val split: the trainer's eval loader (uint8 path, normalised on the device) equals
    what serving computes from the same bytes (decode_image(spec=) + eval_transform), to float rounding."""
    sizes = [(1000, 750), (700, 900), (300, 300)]
    for i, side in enumerate(sizes):
        for fmt, ext in (("JPEG", "jpg"), ("PNG", "png")):
            for split in ("train", "val"):
                d = tmp_path / split / f"c{i}"
                d.mkdir(parents=True, exist_ok=True)
                (d / f"x.{ext}").write_bytes(encoded(side, fmt))
    cfg = DataConfig(root=str(tmp_path), image_size=32, eval_resize=36, batch_size=6, workers=0, backend="torchvision")
    split = scan_imagefolder(cfg, ("val",)).splits["val"]
    loaded = torch.cat([x for x, _ in build_eval_loader(cfg, split, 1, 0)])
    spec = EvalSpec.from_data_config(cfg)
    served = torch.stack([eval_transform(spec)(decode_image(open(p, "rb").read(), spec=spec)) for p in split.paths])
    assert loaded.shape == served.shape == (6, 3, 32, 32)
    assert torch.allclose(loaded, served, atol=1e-5), float((loaded - served).abs().max())
    # and it is not the one-pass result (the large inputs really were reduced on load)
    full = torch.stack([one_pass(spec)(decode_image(open(p, "rb").read())) for p in split.paths])
    assert float(np.abs((served - full).numpy()).max()) > 0
