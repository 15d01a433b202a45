"""Triton python model `se_resnet50` for the CPU targets (fp32 and int8): ONNX Runtime on model.onnx, one batched run per execute()."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the copied modules beside this file

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        import json

        import onnxruntime as ort

        import seresnet_serving as sv

        cfg = json.loads(args["model_config"])
        p = sv.params(cfg)
        so = ort.SessionOptions()
        threads = int(p.get("ORT_THREADS", "0"))
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", p.get("ORT_SPINNING", "0"))
        path = os.path.join(args["model_repository"], args["model_version"], p.get("ONNX_FILE", "model.onnx"))
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.input_name = cfg["input"][0]["name"]
        self.output_name = cfg["output"][0]["name"]
        self.metrics = sv.PredictionMetrics(pb_utils, args["model_name"], sv.read_labels(args, cfg))

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
