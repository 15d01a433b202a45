"""Triton python model `se_resnet50` for the CPU-local target: ONNX Runtime on the exported model.onnx, one batched run per execute()."""
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
            sys.path.insert(0, root)  # the stub ignores PYTHONPATH
        import onnxruntime as ort

        from serve.pb_common import read_labels
        from serve.pb_metrics import PredictionMetrics

        so = ort.SessionOptions()
        threads = int(params.get("ORT_THREADS", "0"))
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        path = os.path.join(args["model_repository"], args["model_version"], params.get("ONNX_FILE", "model.onnx"))
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.input_name = cfg["input"][0]["name"]
        self.output_name = cfg["output"][0]["name"]
        self.metrics = PredictionMetrics(pb_utils, args["model_name"], read_labels(args, cfg))

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        batch = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        probs = self.session.run([self.output_name], {self.input_name: batch.astype(np.float32, copy=False)})[0]
        self.metrics.record(probs)
        responses, start = [], 0
        for a in arrays:
            part = np.ascontiguousarray(probs[start:start + a.shape[0]])
            start += a.shape[0]
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, part)]))
        return responses
