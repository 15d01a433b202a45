"""Triton python model `postprocess` (GPU targets, where the classifier is not python): pass probabilities through and record the custom metrics."""
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        root = params.get("PROJECT_ROOT", "")
        if root and os.path.isdir(root) and root not in sys.path:
            sys.path.insert(0, root)
        from serve.pb_common import read_labels
        from serve.pb_metrics import PredictionMetrics

        self.metrics = PredictionMetrics(pb_utils, params.get("METRICS_MODEL", args["model_name"]), read_labels(args, cfg))

    def execute(self, requests):
        responses = []
        for r in requests:
            probs = pb_utils.get_input_tensor_by_name(r, "scores").as_numpy().astype(np.float32, copy=False)
            self.metrics.record(probs)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("probabilities", probs)]))
        return responses
