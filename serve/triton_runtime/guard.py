"""Triton python model `guard` (in front of the DALI `preprocess`): the request checks of the python preprocess, with
no decode. DALI decodes a dynamic batch as one: an input it cannot decode would fail its neighbours too, so every
input is checked here, per request, and only requests that pass reach the decoder.

Checks (seresnet_serving.py): request shape and total bytes, bytes per image, format by magic bytes (JPEG, PNG),
pixel count from the header (Pillow parses it lazily, no pixel is decoded), and a complete file (the JPEG end-of-image
marker, the PNG IEND chunk). A refused request fails alone with INVALID_ARG and counts in the rejection counter.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the copied modules beside this file

import triton_python_backend_utils as pb_utils  # noqa: E402

from seresnet_contract import CHECKED_IMAGE, ENSEMBLE_INPUT  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        import json

        import seresnet_serving as sv

        p = sv.params(json.loads(args["model_config"]))
        self.sv = sv
        self.max_bytes = int(p["MAX_IMAGE_BYTES"])
        self.max_pixels = int(p["MAX_IMAGE_PIXELS"])
        self.max_request_bytes = int(p["MAX_REQUEST_BYTES"])
        self.rejected = sv.RejectionCounter(pb_utils)

    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, ENSEMBLE_INPUT).as_numpy()
            try:
                self.sv.check_request(images, self.max_request_bytes)
                for row in images:
                    self.sv.check_without_decoding(row.tobytes(), self.max_bytes, self.max_pixels)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(CHECKED_IMAGE, images)]))
            except self.sv.Rejected as err:
                self.rejected.count(err.reason)
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"guard: {err}", pb_utils.TritonError.INVALID_ARG)))
        return responses
