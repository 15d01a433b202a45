"""Triton python model `preprocess`: encoded JPEG/PNG bytes -> normalised pixels via train.transforms.eval_transform (imported, never rewritten)."""
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


def _bootstrap(args):
    cfg = json.loads(args["model_config"])
    params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
    root = params.get("PROJECT_ROOT", "")
    if root and os.path.isdir(root) and root not in sys.path:
        sys.path.insert(0, root)  # the stub ignores PYTHONPATH
    return cfg, params


class TritonPythonModel:
    def initialize(self, args):
        cfg, params = _bootstrap(args)
        import torch

        from train.transforms import EvalSpec, ImageDecodeError, decode_image, eval_transform

        torch.set_num_threads(int(params.get("TORCH_THREADS", "1")))
        self.spec = EvalSpec(int(params["IMAGE_SIZE"]), int(params["EVAL_RESIZE"]),
                             tuple(json.loads(params["MEAN"])), tuple(json.loads(params["STD"])))
        self.transform = eval_transform(self.spec)
        self.decode = decode_image
        self.decode_error = ImageDecodeError
        self.max_bytes = int(params["MAX_IMAGE_BYTES"])
        self.max_pixels = int(params["MAX_IMAGE_PIXELS"])
        self.torch = torch

    def _pixels(self, row: np.ndarray) -> np.ndarray:
        # Rows of one multi-image request are zero-padded to a common length; JPEG/PNG decoders ignore trailing bytes.
        img = self.decode(row.tobytes(), self.max_bytes, self.max_pixels)
        return self.transform(img).numpy()

    def execute(self, requests):
        responses = []
        with self.torch.inference_mode():
            for request in requests:
                images = pb_utils.get_input_tensor_by_name(request, "image").as_numpy()
                try:
                    if images.ndim != 2 or images.shape[1] == 0:
                        raise self.decode_error("expected a batch of encoded images, shape [batch, bytes]")
                    pixels = np.stack([self._pixels(row) for row in images]).astype(np.float32)
                    responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("pixels", pixels)]))
                except self.decode_error as err:
                    # Fails this request only; its neighbours in the batch are answered normally.
                    responses.append(pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(f"preprocess: {err}", pb_utils.TritonError.INVALID_ARG)))
        return responses
