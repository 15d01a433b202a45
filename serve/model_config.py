"""Building blocks of Triton ModelConfig protobufs shared by the repository writers (serve/repository.py and its
DALI route, serve/repository_dali.py): the protobuf module, parameters, dynamic batching, request limits, warm-up."""
from __future__ import annotations


def pb():
    from tritonclient.grpc import model_config_pb2 as mc

    return mc


def set_param(cfg, key: str, value) -> None:
    cfg.parameters[key].string_value = str(value)


def add_batching(cfg, serve_cfg) -> None:
    sizes = [s for s in serve_cfg.preferred_batch_sizes if s <= serve_cfg.max_batch_size]
    cfg.dynamic_batching.preferred_batch_size.extend(sizes)
    cfg.dynamic_batching.max_queue_delay_microseconds = serve_cfg.max_queue_delay_us


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
