"""Triton python model `preprocess`: encoded JPEG/PNG bytes -> normalised pixels with the training eval transform.

`seresnet_eval.py` beside this file is a verbatim copy of the project's train/transforms.py and `eval_spec.json` its
spec, both written by the repository writer; guards and per-request errors come from `seresnet_serving.py`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the copied modules beside this file

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        import json

        import torch
        from PIL import Image

        import seresnet_eval
        import seresnet_serving as sv

        cfg = json.loads(args["model_config"])
        p = sv.params(cfg)
        torch.set_num_threads(int(p.get("TORCH_THREADS", "1")))
        spec = sv.read_json(args, p.get("EVAL_SPEC_FILE", "eval_spec.json"))
        self.spec = seresnet_eval.EvalSpec.from_dict(spec)
        self.transform = seresnet_eval.eval_transform(self.spec)
        self.decode, self.decode_error = seresnet_eval.decode_image, seresnet_eval.ImageDecodeError
        self.max_bytes = int(p["MAX_IMAGE_BYTES"])
        self.max_pixels = int(p["MAX_IMAGE_PIXELS"])
        self.max_request_bytes = int(p["MAX_REQUEST_BYTES"])
        # Our pixel limit is checked after Image.open (a lazy header parse) and before any pixel is decoded
        # (https://pillow.readthedocs.io/en/stable/reference/Image.html#PIL.Image.open), so Pillow's own, higher
        # guard would only pre-empt ours with another message: ours is the one that refuses.
        Image.MAX_IMAGE_PIXELS = None
        self.sv = sv
        self.rejected = sv.RejectionCounter(pb_utils)
        self.torch = torch

    def _pixels(self, row: np.ndarray) -> np.ndarray:
        # Rows of one multi-image request are zero-padded to a common length; JPEG/PNG decoders ignore trailing bytes.
        data = row.tobytes()
        self.sv.check_image_bytes(data, self.max_bytes)
        self.sv.image_format(data)
        try:
            img = self.decode(data, self.max_bytes, self.max_pixels, self.spec)
        except self.decode_error as err:
            raise self.sv.Rejected(self.sv.rejection_reason(str(err)), str(err)) from None
        return self.transform(img).numpy()

    def execute(self, requests):
        responses = []
        with self.torch.inference_mode():
            for request in requests:
                images = pb_utils.get_input_tensor_by_name(request, "image").as_numpy()
                try:
                    self.sv.check_request(images, self.max_request_bytes)
                    pixels = np.stack([self._pixels(row) for row in images]).astype(np.float32)
                    responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("pixels", pixels)]))
                except self.sv.Rejected as err:
                    # Fails this request only; its neighbours in the batch are answered normally.
                    self.rejected.count(err.reason)
                    responses.append(pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"preprocess: {err}", pb_utils.TritonError.INVALID_ARG)))
        return responses
