"""Building blocks of Triton ModelConfig protobufs shared by the repository writers (serve/repository.py and its
DALI route, serve/repository_dali.py): the protobuf module, parameters, dynamic batching with a bounded queue,
request limits, warm-up."""
from __future__ import annotations

# Load shedding: every dynamically batched model (all but the ensemble, whose steps queue in their own models) rejects
# a request at once with UNAVAILABLE (gRPC) / 503 (HTTP) instead of growing its queue and memory without bound.
# The queue TIMEOUT is the way load is shed: a request that waited QUEUE_TIMEOUT_MS in a model's queue is rejected
# ("Request timeout expired"). It is sized to the latency budget: 20x the 100 ms p99 that pages
# (TritonLatencyP99High), so only a backlog that cannot drain is shed, and Triton counts it as
# nv_inference_request_failure{reason="REJECTED"} on the composing model, which the alerts read as shed load (a
# warning). max_queue_size is the MEMORY backstop: a full queue ("Exceeds maximum queue size") is counted by no
# composing model, only by the ensemble as reason="OTHER", which pages as a server error (measured on tritonserver
# 2.51), so it must be rare, and it bounds the bytes a queue holds:
# - preprocess and guard (whole encoded requests, up to serve.max_request_bytes each): floor(QUEUE_BYTES_BUDGET /
#   max_request_bytes), at least 1: 512 MiB / 40 MB = floor(536870912 / 40000000) = 13 requests, <= 520 MB each.
# - the classifier (fixed-size pixels): QUEUE_BATCHES x max_batch_size requests of 3 x S x S float32 each (imagenet):
#   4 x 64 x 3 x 224 x 224 x 4 B = 256 x 602112 B = 154 MB (147 MiB), below the budget; postprocess holds scores
#   (4 x 64 x 1000 x 4 B = 1 MB).
# The client retries both answers with backoff (serve/client.py). `serve.max_queue_size` / `serve.queue_timeout_ms`
# in a serving spec override them for every model.
QUEUE_BATCHES = 4
QUEUE_TIMEOUT_MS = 2000
QUEUE_BYTES_BUDGET = 512 * 2**20   # encoded request bytes one python model's queue may hold
# The python decode models (preprocess; guard on the DALI route) get a whole dynamic batch of requests in their stub's
# shared-memory region at once, and every stub shares the pod's /dev/shm: their batch is bounded here (decode runs
# one image at a time per instance anyway; parallelism comes from instances), so /dev/shm needs at most
# instances x PYTHON_MAX_BATCH x (MAX_REQUEST_BYTES + output bytes) (python_shm_bytes; k8s/serving/base/deployment.yaml
# sizes the volume with it, tests/test_k8s_manifests.py checks). The ensemble's batch is the same (Triton refuses an
# ensemble whose max_batch_size exceeds a step's); the classifier still batches up to serve.max_batch_size.
PYTHON_MAX_BATCH = 4
STUB_SHM_BYTES = 1 << 20   # the python backend's default region per stub (shm-default-byte-size)


def python_batch(serve_cfg) -> int:
    return min(PYTHON_MAX_BATCH, int(serve_cfg.max_batch_size))


def python_shm_bytes(instances: int, max_batch: int, input_bytes: int, output_bytes: int) -> int:
    """/dev/shm a python model can hold at once: every instance with a full batch of largest requests in flight."""
    return int(instances) * (int(max_batch) * (int(input_bytes) + int(output_bytes)) + STUB_SHM_BYTES)


def request_bytes_limit(serve_cfg) -> int:
    """Total encoded bytes one request may carry: `serve.max_request_bytes` where the config has it, else two images at the byte limit."""
    return int(getattr(serve_cfg, "max_request_bytes", 0) or 2 * serve_cfg.max_image_bytes)


def pb():
    from tritonclient.grpc import model_config_pb2 as mc

    return mc


def set_param(cfg, key: str, value) -> None:
    cfg.parameters[key].string_value = str(value)


def queue_limits(serve_cfg, request_bytes: int = 0) -> tuple[int, int]:
    """(max_queue_size, queue timeout in microseconds) of a dynamically batched model; ``request_bytes``: the largest
    request a model taking encoded bytes queues (preprocess, guard), whose queue is then bounded in bytes."""
    size = getattr(serve_cfg, "max_queue_size", None)
    if not size:
        size = (max(1, QUEUE_BYTES_BUDGET // int(request_bytes)) if request_bytes
                else QUEUE_BATCHES * serve_cfg.max_batch_size)
    return int(size), 1000 * int(getattr(serve_cfg, "queue_timeout_ms", None) or QUEUE_TIMEOUT_MS)


def add_batching(cfg, serve_cfg, request_bytes: int = 0) -> None:
    """Dynamic batching (preferred sizes up to the model's max_batch_size, queue delay) with the bounded REJECT queue
    above (ModelQueuePolicy of Triton's model_config.proto: timeout_action, default_timeout_microseconds, max_queue_size).
    ``request_bytes``: see queue_limits."""
    sizes = [s for s in serve_cfg.preferred_batch_sizes if s <= min(serve_cfg.max_batch_size, cfg.max_batch_size or s)]
    batching = cfg.dynamic_batching
    batching.preferred_batch_size.extend(sizes)
    batching.max_queue_delay_microseconds = serve_cfg.max_queue_delay_us
    size, timeout_us = queue_limits(serve_cfg, request_bytes)
    policy = batching.default_queue_policy
    policy.timeout_action = pb().ModelQueuePolicy.REJECT
    policy.default_timeout_microseconds = timeout_us
    policy.max_queue_size = size


def set_limits(cfg, serve_cfg, max_request_bytes: int) -> None:
    """The request guards' limits, read by seresnet_serving in the python preprocess and the guard."""
    for key, value in {"MAX_IMAGE_BYTES": serve_cfg.max_image_bytes, "MAX_IMAGE_PIXELS": serve_cfg.max_image_pixels,
                       "MAX_REQUEST_BYTES": max_request_bytes}.items():
        set_param(cfg, key, value)


def add_jpeg_warmup(cfg, input_name: str, nbytes: int) -> None:
    """One warm-up request with the model folder's warmup/sample.jpg (``nbytes`` long) as ``input_name``."""
    warm = cfg.model_warmup.add(name="sample_jpeg", batch_size=1)
    warm.inputs[input_name].data_type = pb().TYPE_UINT8
    warm.inputs[input_name].dims.append(nbytes)
    warm.inputs[input_name].input_data_file = "sample.jpg"
