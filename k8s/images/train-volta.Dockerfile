# syntax=docker/dockerfile:1
# Training image for Volta (V100) GPUs (7.0): the project (train, serve, launch) with torch cu126 build, DALI and
# DeepSpeed, non-root (uid 1000). One image per GPU generation; versions from train/compat.yaml (`train_images.volta`,
# tests/test_compat_train.py holds this file to it).
# Build from the repository root:
#   docker build -f k8s/images/train-volta.Dockerfile -t REGISTRY/seresnet-stack/train:0.1.0-cu126 .
# `python -m launch k8s` picks the tag suffix from cluster.gpu_arch (cu126 for 7.0).
#
# Why a separate Volta image: PyTorch builds sm_70 (V100) kernels only into its CUDA 12.6 wheels since 2.11, and
# 2.14.x is the last release with a cu126 build (2.15 removes it: pytorch/pytorch#172352, #190385); the cu130 wheel
# has no sm_70 kernels, so on a V100 its first kernel fails. The CUDA 12.6 base carries the matching runtime and
# sets NVIDIA_REQUIRE_CUDA=cuda>=12.6 (with brand=...,driver>=470,driver<471 entries for the 470, 535 and 550
# branches), so the NVIDIA container toolkit starts the container on a driver >= 560.28.03, or on a 470, 535 or 550
# branch driver through the image's CUDA forward-compatibility libraries (datacenter GPUs such as the V100), and
# refuses every other driver below 560 instead of torch silently finding no GPU (train/compat.yaml). The torch wheel bundles its own CUDA 12.6 libraries (nvidia-* wheels); only the driver comes
# from the node.
FROM nvidia/cuda:12.6.3-base-ubuntu24.04

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
ARG TORCH=2.14.1
ARG TORCHVISION=0.29.1
ARG DALI_PACKAGE=nvidia-dali-cuda120
ARG DALI=2.4.0
ARG DEEPSPEED=0.19.8
# Compute capabilities this image must run; the build fails unless torch.cuda.get_arch_list() covers each one.
ARG TARGET_ARCHS="7.0"

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
# local build (2.14.1+cu126) satisfies, so the project install below keeps it.
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
