# Serving image: NVIDIA's Triton image, pinned by tag, plus the trtexec of the SAME TensorRT (a plan loads only
# in the TensorRT that built it), this project's packages and the model repository written by
# `python -m serve repository --target onnx`. Versions: train/compat.yaml `serving:` (tests/test_compat_serving.py
# holds the ARGs below to its `current` row). The init container (same image) turns the ONNX classifier into a
# TensorRT plan on the serving GPU with /opt/trtexec/bin/trtexec.
# Build from the repository root after writing the repository into runs/model_repository_k8s:
#   python -m serve repository --checkpoint runs/demo/checkpoints/best.pt --out runs/model_repository_k8s --target onnx
#   docker build -f k8s/images/serve.Dockerfile -t REGISTRY/seresnet-triton:26.09-py3-TAG .
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:26.09-py3
ARG TRTEXEC_IMAGE=nvcr.io/nvidia/tensorrt:26.09-py3

# trtexec and the TensorRT libraries it links, from NVIDIA's TensorRT container of the same release: the Triton
# image is not documented to ship trtexec, and NVIDIA's answer for Triton plans is the TensorRT container of the
# same yy.mm (triton-inference-server/server#3904). The build fails if its version tag is not the table's.
FROM ${TRTEXEC_IMAGE} AS trtexec
ARG TENSORRT_TAG=110300
RUN set -eu; \
    t=$(command -v trtexec || echo /opt/tensorrt/bin/trtexec); \
    mkdir -p /out/bin /out/lib; cp "$t" /out/bin/trtexec.bin; \
    libdir=$(dirname "$(ldd "$t" | awk '/libnvinfer\.so/ {print $3}')"); \
    major=$((TENSORRT_TAG / 10000)); \
    cp -P "$libdir"/libnvinfer.so.${major}* "$libdir"/libnvinfer_plugin.so.${major}* "$libdir"/libnvonnxparser.so.${major}* /out/lib/; \
    cp -P "$libdir"/libnvinfer_builder_resource*.so* /out/lib/ 2>/dev/null || true; \
    printf '#!/bin/sh\nLD_LIBRARY_PATH=/opt/trtexec/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec /opt/trtexec/bin/trtexec.bin "$@"\n' > /out/bin/trtexec; \
    chmod 0755 /out/bin/trtexec; \
    "$t" --help 2>&1 | grep -q "\[TensorRT v${TENSORRT_TAG}\]" || { echo "trtexec in ${TRTEXEC_IMAGE:-the TensorRT image} is not TensorRT v${TENSORRT_TAG}" >&2; exit 1; }

FROM ${TRITON_IMAGE}
ARG TENSORRT_TAG=110300
# The python stub runs the image's python3: the python models are written for this version (train/compat.yaml python_stub).
ARG PYTHON_STUB=3.12
# Ubuntu 24.04 marks the image's python 3.12 as externally managed (PEP 668); this image is that environment's owner.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1 HOME=/tmp
COPY --from=trtexec /out /opt/trtexec
RUN /opt/trtexec/bin/trtexec --help 2>&1 | grep -q "\[TensorRT v${TENSORRT_TAG}\]"

# numpy<2: the python models are tested under numpy 1.26 (the local tritonserver 2.51's python backend answers with
# empty tensors under numpy 2); 1.26 has wheels for the image's python 3.12.
# torch/torchvision (train/compat.yaml versions): the shared eval transform of the python preprocess model. CPU-only
# builds: the python models (guard, preprocess, postprocess) run on the CPU, and the CUDA build would add ~3 GB of
# libraries that the GPU models (TensorRT, ONNX Runtime backends; DALI brings its own) never load.
ARG TORCH=2.14.1
ARG TORCHVISION=0.29.1
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /opt/seresnet
COPY pyproject.toml README.md constraints.txt ./
COPY train ./train
COPY serve ./serve
COPY launch ./launch
COPY seresnet ./seresnet
# The tested versions: constraints.txt (the CPU torch above satisfies its torch pin).
RUN pip install --index-url "${TORCH_CPU_INDEX}" "torch==${TORCH}" "torchvision==${TORCHVISION}" \
    && pip install -c constraints.txt "numpy<2" "pillow>=10" "pydantic>=2.6" "pyyaml>=6" \
    && pip install --no-deps . \
    && python3 -c "import numpy, torch, train.transforms; assert numpy.__version__ < '2' and torch.version.cuda is None" \
    && python3 -c "import sys; v = '%d.%d' % sys.version_info[:2]; assert v == '${PYTHON_STUB}', f'the image python is {v}, not ${PYTHON_STUB}'"

COPY --chown=1000:1000 runs/model_repository_k8s /models
# A repository written with --preprocess dali has a DALI `preprocess` that the DALI backend autoserializes at load by
# running `python3 -c "import nvidia.dali ..."` (stdlib + DALI only: no numpy in dali.py). Triton 24.04 shipped
# without nvidia.dali on python3's path (triton-inference-server/dali_backend#244; server#7216 set PYTHONPATH
# since): fail the build here, not the first rollout, if this image has that gap.
RUN if [ -f /models/guard/config.pbtxt ]; then python3 -c "import nvidia.dali" || { \
      echo "python3 in this Triton image cannot import nvidia.dali: the --preprocess dali repository cannot load" >&2; exit 1; }; fi
# The Deployment runs as uid 1000 (triton-server in NGC images) with a read-only root filesystem.
USER 1000:1000
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=none"]
