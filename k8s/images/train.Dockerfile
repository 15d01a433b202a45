# Training image: the project (train, serve, launch packages) with DALI and DeepSpeed, non-root (uid 1000).
# Build from the repository root:
#   docker build -f k8s/images/train.Dockerfile -t REGISTRY/seresnet-train:TAG .
# PyPI's torch wheels for Linux carry their CUDA/cuDNN/NCCL libraries, so a slim Python base is enough;
# the node's NVIDIA driver is injected by the container toolkit / GPU operator.
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
# libgomp: OpenMP for torch's CPU ops; numactl: DeepSpeed --bind_cores_to_rank.
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 numactl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --user-group --no-create-home --shell /usr/sbin/nologin seresnet

WORKDIR /app
COPY pyproject.toml README.md ./
COPY train ./train
COPY serve ./serve
COPY launch ./launch
COPY configs ./configs
# Non-editable install: the pods import the packages from site-packages; configs/ stays for reference.
RUN pip install '.[dali,deepspeed,export]' && python -c "import train, launch, torch; print(torch.__version__)"

USER 1000:1000
# The Kubernetes manifests set the command (torchrun or `python -m launch multinode`).
CMD ["python", "-m", "launch", "--help"]
