# Serving image: NVIDIA's Triton image, pinned by tag (24.10 = Triton 2.51, TensorRT 10.5, with trtexec),
# plus this project's packages (the python-backend models import train.transforms: one eval transform for
# training and serving) and the model repository written by `python -m serve repository --target onnx`.
# The init container (same image) turns the ONNX classifier into a TensorRT plan on the serving GPU.
# Build from the repository root after writing the repository into runs/model_repository_k8s:
#   python -m serve repository --checkpoint runs/demo/checkpoints/best.pt --out runs/model_repository_k8s --target onnx
#   docker build -f k8s/images/serve.Dockerfile -t REGISTRY/seresnet-triton:24.10-py3-TAG .
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3
FROM ${TRITON_IMAGE}

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HOME=/tmp
# numpy<2: Triton 2.51's python backend answers with empty tensors when the stub's environment has
# numpy 2 (DESIGN.md). torch/torchvision: the shared eval transform used by the preprocess model.
WORKDIR /opt/seresnet
COPY pyproject.toml README.md ./
COPY train ./train
COPY serve ./serve
COPY launch ./launch
RUN pip install "numpy<2" "pillow>=10" "torch==2.14.1" "torchvision==0.29.1" "pydantic>=2.6" "pyyaml>=6" \
    && pip install --no-deps . \
    && python3 -c "import numpy, train.transforms; assert numpy.__version__ < '2'"

COPY --chown=1000:1000 runs/model_repository_k8s /models
# The Deployment runs as uid 1000 (triton-server in NGC images) with a read-only root filesystem.
USER 1000:1000
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=none"]
