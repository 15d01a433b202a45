"""perf_analyzer (from the tritonclient 2.51 wheel, unpacked by scripts/setup_env.sh) against a running server: throughput and p50/p95/p99."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from serve.errors import ServeError
from serve.server import triton_libs


def perf_analyzer_binary() -> Path:
    return Path(os.environ.get("SERESNET_PERF_ANALYZER", Path(sys.prefix) / "tools" / "perf" / "bin" / "perf_analyzer"))


def _lib_dir(tmp: Path) -> Path:
    # perf_analyzer wants libb64.so.0d and libcudart.so.12; the pytriton wheel ships them under hashed names.
    d = tmp / "libs"
    d.mkdir(exist_ok=True)
    for pattern, name in (("libb64-*.so.0d", "libb64.so.0d"), ("libcudart-*.so.*", "libcudart.so.12")):
        found = sorted(triton_libs().glob(pattern))
        if found and not (d / name).exists():
            (d / name).symlink_to(found[0])
    return d


def run_perf_analyzer(grpc_url: str, images: Sequence[bytes], concurrency: int, model: str = "classify",
                      measurement_ms: int = 3000, max_trials: int = 4, timeout_s: float = 180.0) -> dict:
    """One concurrency point over gRPC with real encoded images as input data; latencies in ms."""
    binary = perf_analyzer_binary()
    if not binary.is_file():
        raise ServeError(f"perf_analyzer not found at '{binary}'; run scripts/setup_env.sh (make venv) to unpack it.")
    with tempfile.TemporaryDirectory(prefix="seresnet-perf-") as tmp:
        t = Path(tmp)
        data = {"data": [{"image": {"content": list(b), "shape": [len(b)]}} for b in images]}
        (t / "input.json").write_text(json.dumps(data))
        env = dict(os.environ, LD_LIBRARY_PATH=f"{_lib_dir(t)}{os.pathsep}{triton_libs()}")
        cmd = [str(binary), "-m", model, "-u", grpc_url, "-i", "grpc", "--input-data", str(t / "input.json"),
               "--concurrency-range", f"{concurrency}:{concurrency}", "-p", str(measurement_ms), "-r", str(max_trials),
               "-s", "100", "-f", str(t / "out.csv")]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not (t / "out.csv").is_file():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            raise ServeError(f"perf_analyzer failed (exit {proc.returncode}): {' | '.join(tail)}")
        row = next(csv.DictReader((t / "out.csv").open()))
    return {"concurrency": concurrency, "throughput": float(row["Inferences/Second"]),
            "p50_ms": float(row["p50 latency"]) / 1e3, "p95_ms": float(row["p95 latency"]) / 1e3,
            "p99_ms": float(row["p99 latency"]) / 1e3}
