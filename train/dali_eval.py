"""The DALI eval graph, defined once: decode, resize the shorter side exactly as torchvision's Resize(int) sizes it,
centre crop, normalise. The trainer's DALI eval pipeline (train/dali.py) builds it, and the repository writer copies
this file verbatim into Triton's DALI `preprocess` model (serve/triton_runtime/dali_preprocess.py): so it imports
nothing of the project, and nvidia.dali only inside the functions (the trainer imports it without DALI installed).

It is the twin of train/transforms.eval_transform (PIL), not a copy: the decoders differ (libjpeg-turbo or nvJPEG vs
Pillow's libjpeg, chroma upsampling included), and DALI resizes large inputs in one pass where the PIL path reduces
them on load. tests/test_dali_serving.py states and checks the tolerance between the two.
"""
from __future__ import annotations

def normalize(images, mean, std, crop=None, mirror=0, channels_last: bool = False, crop_pos=(0.5, 0.5)):
    """float output, CHW, or HWC when the consumer wants channels_last: an NHWC batch is an NCHW channels_last
    tensor after a free permute (no copy). ``mean``/``std`` in 0-1 units, as the configs give them."""
    from nvidia.dali import fn, types

    kwargs = {"crop": (crop, crop), "crop_pos_x": crop_pos[0], "crop_pos_y": crop_pos[1]} if crop else {}
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC" if channels_last else "CHW",
                                    mean=[m * 255.0 for m in mean], std=[s * 255.0 for s in std], mirror=mirror,
                                    **kwargs)


def torchvision_resize_args(images, size: int) -> dict:
    """Output size exactly as torchvision's Resize(int): shorter side -> size, longer side truncated (not rounded)."""
    from nvidia.dali import math as dmath, types

    shape = images.shape(dtype=types.FLOAT)  # HWC
    h, w = shape[0], shape[1]
    short = dmath.min(h, w)
    # +1e-3 guards float32 error on exact integers; int() in torchvision truncates
    return {"resize_y": dmath.floor(h * size / short + 1e-3), "resize_x": dmath.floor(w * size / short + 1e-3)}


def torchvision_crop_pos(extent, size: int):
    """The normalised crop position whose anchor, crop_pos * (extent - size), is torchvision CenterCrop's
    int(round((extent - size) / 2.0)). Python rounds halves to even (2.5 -> 2, 1.5 -> 2) where DALI's anchor rounds
    them up: with a plain 0.5 an odd margin of 5 px crops one pixel lower than training evaluation did."""
    from nvidia.dali import math as dmath

    d = extent - size
    k = dmath.floor(d / 2)
    odd = d - 2 * k                        # 1 when the margin is odd: the offset is k + 0.5
    k_odd = k - 2 * dmath.floor(k / 2)     # round half to even: up only from an odd k
    return (k + odd * k_odd) / dmath.max(d, 1)


def eval_graph(encoded, image_size: int, eval_resize: int, mean, std, decode_device: str, channels_last: bool = False):
    """Encoded JPEG/PNG bytes (a DALI node) -> normalised float pixels, [3, S, S] (or [S, S, 3] for channels_last)."""
    from nvidia.dali import fn, types

    # nvJPEG's memory padding stays at DALI's defaults here: an eval pass (or a served request) may reallocate once
    images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)
    images = fn.resize(images, **torchvision_resize_args(images, eval_resize), interp_type=types.INTERP_LINEAR,
                       antialias=True)
    shape = images.shape(dtype=types.FLOAT)  # HWC
    pos = (torchvision_crop_pos(shape[1], image_size), torchvision_crop_pos(shape[0], image_size))
    return normalize(images, mean, std, image_size, 0, channels_last, pos)
