"""Closed-loop load generator on grpc.aio: N concurrent requests in flight against the `classify` ensemble; throughput and latency percentiles."""
from __future__ import annotations

import asyncio
import time
from typing import Sequence

import numpy as np


async def _run(url: str, images: Sequence[bytes], concurrency: int, duration_s: float, warmup_s: float, model: str) -> dict:
    import tritonclient.grpc.aio as aio
    from tritonclient.grpc import InferInput, InferRequestedOutput

    arrays = [np.frombuffer(b, np.uint8)[None, :] for b in images]
    client = aio.InferenceServerClient(url)
    latencies: list[float] = []
    completions: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    async def worker(wid: int) -> None:
        nonlocal errors
        i = wid
        while time.perf_counter() < stop_at:
            arr = arrays[i % len(arrays)]
            i += concurrency
            inp = InferInput("image", list(arr.shape), "UINT8")
            inp.set_data_from_numpy(arr)
            t0 = time.perf_counter()
            try:
                res = await client.infer(model, [inp], outputs=[InferRequestedOutput("probabilities", class_count=1)])
                ok = res.as_numpy("probabilities").size > 0
            except Exception:  # noqa: BLE001 - counted, the load goes on
                ok = False
            t1 = time.perf_counter()
            # Latency: every request started in the window; throughput: completions inside the window.
            if ok and t0 >= measure_from:
                latencies.append(t1 - t0)
            if ok and measure_from <= t1 <= stop_at:
                completions.append(t1)
            if not ok and t0 >= measure_from:
                errors += 1

    try:
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    finally:
        await client.close()
    lat = np.array(latencies) * 1e3
    return {
        "concurrency": concurrency, "requests": int(lat.size), "errors": errors,
        "throughput": len(completions) / duration_s,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "p95_ms": float(np.percentile(lat, 95)) if lat.size else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
    }


def run_load(url: str, images: Sequence[bytes], concurrency: int, duration_s: float = 5.0, warmup_s: float = 1.0,
             model: str = "classify") -> dict:
    """Keep ``concurrency`` requests in flight for ``duration_s`` (after ``warmup_s``); images/s and p50/p95/p99 in ms."""
    return asyncio.run(_run(url, images, concurrency, duration_s, warmup_s, model))
