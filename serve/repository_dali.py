"""The DALI route of a GPU repository (`serve repository --preprocess dali`): `guard` (python request checks, no
decode) -> `preprocess` (DALI backend: nvJPEG decode and the trainer's DALI eval graph on the GPU).

Model configs and version-folder files; serve/repository.py writes them beside se_resnet50 and the ensemble.
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import train.dali_eval
from serve.contract import (CHECKED_IMAGE, DALI_EVAL_FILE, DALI_PARAMS_FILE, DALI_PIPELINE_FILE, ENSEMBLE_INPUT,
                            EVAL_SPEC_FILE, GUARD, PIXELS, PREPROCESS)
from serve.errors import ServeError
from serve.model_config import add_batching, add_jpeg_warmup, pb, python_batch, request_bytes_limit, set_limits
from train.compat import load_table

RUNTIME = Path(__file__).resolve().parent / "triton_runtime"
# Set by the check that runs the route (scripts/gpu_dali_check.py, the tests): writing is allowed before the route is
# marked checked, since running it is how it gets checked.
UNCHECKED_ENV = "SERESNET_DALI_UNCHECKED"


def require_checked_route() -> None:
    """The DALI route stays off until its dali.py has been run by the pinned image's DALI: the DALI backend
    autoserializes dali.py with the image's own DALI at model load, not with the DALI the tests run (train/compat.yaml
    `dali`); `make gpu-check` runs it (step dali_serving), and the table's `dali_checked` records that."""
    serving = load_table()["serving"]
    row = serving["rows"][serving["current"]]
    if not row.get("dali_checked") and os.environ.get(UNCHECKED_ENV) != "1":
        raise ServeError(f"the DALI route is off: its dali.py has not yet been run by DALI {row['dali']} of Triton "
                         f"{serving['current']} (train/compat.yaml serving: dali_checked is false); run `make gpu-check` "
                         "with that DALI (step dali_serving) and set dali_checked: true, or use --preprocess python.")
DALI_THREADS = 4   # CPU threads of the DALI pipeline (JPEG headers, PNG decode stays on the CPU); 'mixed' decodes on the GPU


def guard_config(serve_cfg, instances: int, max_request_bytes: int):
    """ModelConfig of `guard`: the byte, format, header-pixel and completeness checks; passes the bytes through."""
    mc = pb()
    cfg = mc.ModelConfig(name=GUARD, backend="python", max_batch_size=python_batch(serve_cfg))   # /dev/shm bound
    # ragged: single-image requests of different byte lengths batch together (each request is checked on its own)
    cfg.input.add(name=ENSEMBLE_INPUT, data_type=mc.TYPE_UINT8, dims=[-1], allow_ragged_batch=True)
    cfg.output.add(name=CHECKED_IMAGE, data_type=mc.TYPE_UINT8, dims=[-1])
    add_batching(cfg, serve_cfg, request_bytes=max_request_bytes)   # its queue holds encoded requests: bounded in bytes
    cfg.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    set_limits(cfg, serve_cfg, max_request_bytes)
    return cfg


def dali_preprocess_config(serve_cfg, image_size: int, warmup_bytes: int):
    """ModelConfig of the DALI `preprocess`: one GPU instance (dali_backend's advice), dynamic batching, a warm-up
    JPEG (nvJPEG's first decode allocates); the pipeline is dali.py in the version folder (autoserialized at load),
    its input named as the external source."""
    mc = pb()
    cfg = mc.ModelConfig(name=PREPROCESS, backend="dali", max_batch_size=serve_cfg.max_batch_size)
    # ragged: encoded images differ in length; without it the dynamic batcher only groups equal-length requests
    # (dali_backend docs/tutorials/training_to_inference.md, "Triton accepts batches with uniform shapes")
    cfg.input.add(name=CHECKED_IMAGE, data_type=mc.TYPE_UINT8, dims=[-1], allow_ragged_batch=True)
    cfg.output.add(name=PIXELS, data_type=mc.TYPE_FP32, dims=[3, image_size, image_size])
    add_batching(cfg, serve_cfg, request_bytes=request_bytes_limit(serve_cfg))   # queues encoded requests: bytes-bounded
    cfg.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_GPU)
    add_jpeg_warmup(cfg, CHECKED_IMAGE, warmup_bytes)
    return cfg


def dali_preprocess_files(eval_spec: dict, max_batch_size: int, warmup_jpeg: bytes) -> dict[str, Path | bytes]:
    """Version folder of the DALI `preprocess`: dali.py, the trainer's DALI eval graph verbatim, spec and params;
    the warm-up image."""
    params = {"input": CHECKED_IMAGE, "max_batch_size": int(max_batch_size), "num_threads": DALI_THREADS}
    return {"warmup/sample.jpg": warmup_jpeg, f"1/{DALI_PIPELINE_FILE}": RUNTIME / "dali_preprocess.py",
            f"1/{DALI_EVAL_FILE}": Path(inspect.getsourcefile(train.dali_eval)),
            f"1/{EVAL_SPEC_FILE}": json.dumps(eval_spec, indent=2).encode(),
            f"1/{DALI_PARAMS_FILE}": json.dumps(params, indent=2).encode()}


def add_guard_step(steps) -> str:
    """The ensemble's first step with DALI: image -> guard -> checked_image (the tensor preprocess reads)."""
    g = steps.add(model_name=GUARD, model_version=-1)
    g.input_map[ENSEMBLE_INPUT] = ENSEMBLE_INPUT
    g.output_map[CHECKED_IMAGE] = CHECKED_IMAGE
    return CHECKED_IMAGE
