"""Triton python model `postprocess` (GPU targets, where the classifier is not python): pass probabilities through and record the custom metrics."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the copied modules beside this file

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        import json

        import seresnet_serving as sv

        cfg = json.loads(args["model_config"])
        p = sv.params(cfg)
        self.metrics = sv.PredictionMetrics(pb_utils, p.get("METRICS_MODEL", args["model_name"]), sv.read_labels(args, cfg))

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, "scores").as_numpy().astype(np.float32, copy=False) for r in requests]
        self.metrics.record(np.concatenate(arrays) if len(arrays) > 1 else arrays[0])  # one batched record per execute()
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("probabilities", a)]) for a in arrays]
