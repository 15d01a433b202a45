"""Serving: ONNX/TensorRT export, the Triton model repository writer, a local tritonserver runner and clients."""
