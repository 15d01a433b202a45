"""Triton DALI-backend model `preprocess` (GPU targets with `--preprocess dali`): encoded JPEG/PNG bytes -> normalised
pixels, decoded on the GPU (nvJPEG through DALI's 'mixed' decoder), resized and cropped there.

The repository writer copies this file as `dali.py` into the version folder, where the DALI backend finds it and
autoserializes it at model load with the DALI of the Triton image (dali_backend README, "Autoserialization"): no
pipeline serialized by another DALI version is ever loaded. The graph is `seresnet_dali_eval.py` beside it (a
verbatim copy of the trainer's train/dali_eval.py), its spec `eval_spec.json`, the batch size and threads
`dali_params.json`. Requests arrive through `guard` (python), which refuses what the decoder should never see.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the copied graph module beside this file

import nvidia.dali as dali  # noqa: E402
from nvidia.dali import fn, types  # noqa: E402
from nvidia.dali.plugin.triton import autoserialize  # noqa: E402

import seresnet_dali_eval  # noqa: E402

with open(os.path.join(HERE, "eval_spec.json")) as f:
    SPEC = json.load(f)
with open(os.path.join(HERE, "dali_params.json")) as f:
    PARAMS = json.load(f)


def graph(decode_device: str):
    """The external source named as the model's input -> pixels; 'mixed' when served, 'cpu' for parity checks."""
    encoded = fn.external_source(device="cpu", name=PARAMS["input"], dtype=types.UINT8, ndim=1)
    return seresnet_dali_eval.eval_graph(encoded, int(SPEC["image_size"]), int(SPEC["eval_resize"]), SPEC["mean"],
                                         SPEC["std"], decode_device)


@autoserialize
@dali.pipeline_def(batch_size=PARAMS["max_batch_size"], num_threads=PARAMS["num_threads"], device_id=0,
                   output_dtype=[types.FLOAT], output_ndim=[3])
def pipe():
    return graph("mixed")
