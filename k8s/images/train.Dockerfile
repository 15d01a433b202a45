# syntax=docker/dockerfile:1
# Training image for Turing to Blackwell (T4, A100, L4/L40, H100/H200, B200) GPUs (7.5 8.0 8.6 8.9 9.0 10.0 12.0): the project (train, serve, launch) with torch cu130 build, DALI and
# DeepSpeed, non-root (uid 1000). One image per GPU generation; versions from train/compat.yaml (`train_images.ampere_plus`,
# tests/test_compat_train.py holds this file to it).
# Build from the repository root:
#   docker build -f k8s/images/train.Dockerfile -t REGISTRY/seresnet-stack/train:0.1.0-cu130 .
# `python -m launch k8s` picks the tag suffix from cluster.gpu_arch (cu130 for 7.5 and newer).
#
# The CUDA 13.0 build covers Turing (7.5) to Blackwell (10.0, 12.0) and needs an NVIDIA driver >= 580; the CUDA 13.0
# base sets NVIDIA_REQUIRE_CUDA=cuda>=13.0, so the NVIDIA container toolkit refuses to start the container on an
# older driver (one clear error) instead of torch finding no usable GPU and every rank training on CPU. V100 (7.0)
# has no kernels in this build: use train-volta.Dockerfile (cu126). The torch wheel bundles its own CUDA libraries
# (nvidia-* wheels); only the driver comes from the node.
FROM nvidia/cuda:13.0.0-base-ubuntu24.04

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ARG TORCH=2.14.1
ARG TORCHVISION=0.29.1
ARG DALI_PACKAGE=nvidia-dali-cuda130
ARG DALI=2.4.0
ARG DEEPSPEED=0.19.8
# Compute capabilities this image must run; the build fails unless torch.cuda.get_arch_list() covers each one.
ARG TARGET_ARCHS="7.5 8.0 8.6 8.9 9.0 10.0 12.0"

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp TORCH_EXTENSIONS_DIR=/tmp/torch_extensions VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# python3-venv: Ubuntu 24.04's Python 3.12 refuses system-wide pip installs (PEP 668), so the project lives in
# /opt/venv. libgomp: OpenMP for torch's CPU ops; numactl: DeepSpeed --bind_cores_to_rank. No compiler: ZeRO 0-2
# with the torch optimizers the engine passes to DeepSpeed needs none of its JIT-compiled ops.
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv libgomp1 numactl \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && (userdel -r ubuntu 2>/dev/null || true) \
    && useradd --uid 1000 --user-group --no-create-home --shell /usr/sbin/nologin seresnet

WORKDIR /app
# torch/torchvision from the PyTorch index of this CUDA build first: pyproject.toml pins torch==2.14.1, which the
# local build (2.14.1+cu130) satisfies, so the project install below keeps it.
RUN pip install --index-url "$TORCH_INDEX" "torch==$TORCH" "torchvision==$TORCHVISION"
# The build's arch check (no GPU needed): every target capability X.Y has kernels sm_X<=Y of the same major
# (CUDA SASS runs on later minors of its major, e.g. sm_86 on 8.9), so the image can never meet a GPU it cannot drive.
RUN python -c "import os, torch; have = [a[3:] for a in torch.cuda.get_arch_list() if a.startswith('sm_')]; \
cap = lambda s: (int(s[:-1]), int(s[-1])); \
miss = [t for t in os.environ['TARGET_ARCHS'].split() if not any(cap(h)[0] == int(t.split('.')[0]) and cap(h)[1] <= int(t.split('.')[1]) for h in have)]; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'archs', torch.cuda.get_arch_list()); \
assert not miss, f'torch {torch.__version__} has no kernels for compute capability {miss}: use the image built for that GPU generation'"

COPY pyproject.toml README.md constraints.txt ./
COPY train ./train
COPY serve ./serve
COPY launch ./launch
COPY seresnet ./seresnet
# launch/k8s_training links to k8s/training: the manifests `seresnet launch k8s` renders from ship in the package.
COPY k8s/training ./k8s/training
# Non-editable install with the tested versions (constraints.txt; the torch above satisfies its torch pin): the pods
# import the packages, the packaged configs and compat.yaml from site-packages, and `seresnet` is on PATH.
RUN pip install -c constraints.txt "$DALI_PACKAGE==$DALI" "deepspeed==$DEEPSPEED" '.[export]' \
    && python -c "import train, launch, torch, nvidia.dali, deepspeed; assert torch.__version__.startswith('$TORCH+'), torch.__version__; print(torch.__version__)"

USER 1000:1000
# The Kubernetes manifests set the command (torchrun or `python -m launch multinode`).
CMD ["seresnet", "--help"]
