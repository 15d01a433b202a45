"""GPU check of the DALI serving route (`make gpu-check` step dali_serving): a `--preprocess dali` repository is written
from a checkpoint, its `preprocess/1/dali.py` is autoserialized exactly as Triton's DALI backend does it at model load
(dali_backend src/model_provider/model_provider.h: importlib from the file, then invoke_autoserialize), the
serialized pipeline runs on the GPU ('mixed' nvJPEG decode) over the sample photos and demo-sized images, and its
pixels are compared with the python preprocess (PIL) under the tolerance tests/test_dali_serving.py states for the
CPU decoder. Also times images/s of both at the repository's max batch. Writes dali_serving.json.

usage: python -m scripts.gpu_dali_check CHECKPOINT OUT_DIR
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from serve.contract import CHECKED_IMAGE, DALI_PIPELINE_FILE, PREPROCESS
from serve.export import export_onnx
from serve.repository import write_model_repository
from serve.repository_dali import UNCHECKED_ENV
from serve.images import sample_image_bytes
from train.compat import load_table
from train.transforms import EvalSpec, decode_image, eval_transform

AUTOSERIALIZE = """
import importlib, sys
from nvidia.dali._utils.autoserialize import invoke_autoserialize
spec = importlib.util.spec_from_file_location('autoserialize_mod', sys.argv[1])
head_module = importlib.util.module_from_spec(spec)
sys.modules['autoserialize_mod'] = head_module
spec.loader.exec_module(head_module)
invoke_autoserialize(head_module, sys.argv[2])
"""


def images() -> dict[str, bytes]:
    from PIL import Image

    out = dict(sample_image_bytes())
    for side in (20, 28, 40, 60):
        for fmt in ("PNG", "JPEG"):
            buf = io.BytesIO()
            Image.open(io.BytesIO(out["chelsea.jpg"])).resize((side, side + 7)).save(buf, format=fmt)
            out[f"small{side}.{fmt}"] = buf.getvalue()
    return out


def main(checkpoint: str, out_dir: str) -> int:
    import torch
    from nvidia.dali import Pipeline

    if not torch.cuda.is_available():
        print("gpu_dali_check: no CUDA device; run it on a GPU machine.", file=sys.stderr)
        return 2
    import nvidia.dali

    out = Path(out_dir)
    export_onnx(checkpoint, out / "export")
    os.environ[UNCHECKED_ENV] = "1"   # this run is the check that turns the route on (serve/repository_dali.py)
    repo = write_model_repository(out / "export", out / "repo", "onnx", preprocess="dali")
    version = repo / PREPROCESS / "1"
    serialized = out / "model.dali"
    subprocess.run([sys.executable, "-c", AUTOSERIALIZE, str(version / DALI_PIPELINE_FILE), str(serialized)], check=True)
    params = json.loads((version / "dali_params.json").read_text())
    spec = EvalSpec.from_dict(json.loads((version / "eval_spec.json").read_text()))
    pipe = Pipeline.deserialize(serialized_pipeline=serialized.read_bytes(), device_id=0)

    imgs = images()
    names = list(imgs)
    batch = [np.frombuffer(imgs[n], np.uint8) for n in names]
    pipe.feed_input(CHECKED_IMAGE, batch)
    (got,) = pipe.run()
    dali = np.stack([np.asarray(got.as_cpu()[i]) for i in range(len(names))])
    tf = eval_transform(spec)
    pil = np.stack([tf(decode_image(imgs[n], spec=spec)).numpy() for n in names])
    grey = np.abs(dali - pil) * np.array(spec.std).reshape(1, 3, 1, 1) * 255
    small = [i for i, n in enumerate(names) if n.startswith("small")]

    full = (batch * (params["max_batch_size"] // len(batch) + 1))[: params["max_batch_size"]]
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        pipe.feed_input(CHECKED_IMAGE, full)
        pipe.run()
    dali_ips = n * len(full) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for a in full:
        tf(decode_image(a.tobytes(), spec=spec))
    pil_ips = len(full) / (time.perf_counter() - t0)
    serving = load_table()["serving"]
    pinned = serving["rows"][serving["current"]]["dali"]
    # Only a run with the pinned image's DALI may turn the route on (train/compat.yaml dali_checked).
    res = {"gpu": torch.cuda.get_device_name(0), "dali": nvidia.dali.__version__, "pinned_image_dali": pinned,
           "checks_the_pinned_image": nvidia.dali.__version__ == pinned, "images": len(names), "mean_grey_diff": float(grey.mean()),
           "max_grey_diff_small": float(grey[small].max()), "max_grey_diff_all": float(grey.max()),
           "batch": len(full), "dali_mixed_images_per_second": round(dali_ips, 1),
           "pil_one_core_images_per_second": round(pil_ips, 1), "ratio": round(dali_ips / pil_ips, 2)}
    (out / "dali_serving.json").write_text(json.dumps(res, indent=2))
    print(res)
    ok = res["mean_grey_diff"] <= 1.0 and res["max_grey_diff_small"] <= 2.0 + 1e-3
    if not ok:
        print("gpu_dali_check: the GPU decoder's pixels are outside the stated tolerance (mean <= 1 grey level, "
              "small inputs <= 2); see dali_serving.json.", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
