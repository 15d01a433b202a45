"""Serving benchmark, every pair alternated and repeated (medians): ONNX Runtime vs PyTorch eager; static QDQ int8 vs
fp32, both int8 files (size, latency at batch 1 and 16, top-1 drift on the full test split; the TensorRT file held to
TensorRT's Q/DQ rules); preprocess ms/image by format and size; the `classify` ensemble through tritonserver vs the
same work in-process, decoding with the same parallelism as Triton's `preprocess` (serve.preprocess_instances worker
processes) on both sides; served int8 vs served fp32: `classify` at concurrency 16 on the labelled test split, img/s
and top-1 of each.

`run(out_dir, quick=False, checkpoint=None, data_root=None, sections=SECTIONS) -> dict` of flat figures (ratios end in
_ratio/_speedup). Called by scripts/bench.py; `python -m scripts.bench_serve [--quick] [CHECKPOINT]` runs it alone.
"""
from __future__ import annotations

import json
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torchvision import transforms as T

from scripts import bench_inputs as benchdata
from serve.contract import EXPORT_INT8_CPU_ONNX, EXPORT_INT8_ONNX, EXPORT_ONNX, INPUT_NAME, OUTPUT_NAME
from serve.errors import ServeError
from serve.export import WithSoftmax, export_onnx, load_checkpoint, ort_session
from scripts.loadgen import run_load
from scripts.perf import run_perf_analyzer
from serve.evaluate import evaluate_folder
from serve.quantize import compare_latency, drift, pixels, predict, quantize_int8, session
from serve.repository import write_model_repository
from serve.server import TritonServer
from serve.tensorrt_qdq import check_tensorrt_qdq
from train.transforms import EvalSpec, decode_image, eval_transform

SECTIONS = ("model", "int8", "preprocess", "triton", "served")
CONCURRENCIES = (1, 4, 16)


def _median(xs) -> float:
    return float(statistics.median(xs))


def _timeit(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return _median(times)


def _alternate(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Run each measurement once per round, order reversed every other round; the median per name."""
    got: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            got[k].append(fns[k]())
    return {k: _median(v) for k, v in got.items()}


# -- preprocess: the exact code Triton's `preprocess` runs (train/transforms.py, copied verbatim into the repository)
_TF = {}


def _init_worker() -> None:
    torch.set_num_threads(1)  # as Triton's preprocess model does (TORCH_THREADS, default 1)


def _decode_many(args) -> np.ndarray:
    """Worker: encoded images -> float32 [N, 3, S, S] (decode + eval transform), as one preprocess instance does."""
    images, spec = args
    es = EvalSpec(*spec)
    tf = _TF.get(spec) or _TF.setdefault(spec, eval_transform(es))
    return np.stack([tf(decode_image(b, spec=es)).numpy() for b in images])


def one_pass_transform(spec: EvalSpec) -> T.Compose:
    """The eval transform before reduce-on-load: full decode, one antialiased bilinear resize (torchvision)."""
    return T.Compose([T.Resize(spec.eval_resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                      T.CenterCrop(spec.image_size), T.ToTensor(), T.Normalize(spec.mean, spec.std)])


def preprocess_costs(spec: EvalSpec, rounds: int, repeats: int) -> dict:
    """ms/image of decode + eval transform by format (JPEG/PNG) and size (small/large), one core, alternated with
    the one-pass alternative (full decode + one resize) on the same bytes; the largest pixel difference between the
    two in grey levels (0-255)."""
    imgs = benchdata.images_by_format_and_size()
    tf, old = eval_transform(spec), one_pass_transform(spec)
    fns = {}
    for k, b in imgs.items():
        fns[k] = lambda b=b: _timeit(lambda: tf(decode_image(b, spec=spec)), repeats) * 1e3
        fns[f"{k}_one_pass"] = lambda b=b: _timeit(lambda: old(decode_image(b)), repeats) * 1e3
    ms = _alternate(fns, rounds)
    out = {f"preprocess_ms_{k}": v for k, v in ms.items()}
    grey = torch.tensor(spec.std).view(3, 1, 1) * 255
    for k, b in imgs.items():
        out[f"preprocess_{k}_reduce_on_load_vs_one_pass_speedup"] = ms[f"{k}_one_pass"] / ms[k]
        diff = (tf(decode_image(b, spec=spec)) - old(decode_image(b))).abs() * grey
        out[f"preprocess_{k}_max_grey_level_diff"] = float(diff.max())
        out[f"preprocess_bytes_{k}"] = len(b)
    return out


class InProcess:
    """The local limit for the classify work: decode in ``workers`` processes (like Triton's preprocess instances),
    batches of 16 through ONNX Runtime, pipelined (the next batch decodes while the model runs)."""

    def __init__(self, onnx: Path, spec: EvalSpec, workers: int):
        # ORT without spinning, as Triton's CPU classifier runs it: the decode workers share its cores.
        self.sess, self.spec, self.workers = ort_session(onnx, spinning=False), tuple(spec.__dict__.values()), workers
        # spawn: no fork of a process that already runs ORT/OpenMP thread pools.
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)

    def throughput(self, images: Sequence[bytes], batches: int, batch: int = 16) -> float:
        work = [(list(images) * (batch // len(images) + 1))[:batch] for _ in range(batches)]
        chunk = -(-batch // self.workers)
        t0 = time.perf_counter()
        futures = [[self.pool.submit(_decode_many, (b[i:i + chunk], self.spec)) for i in range(0, batch, chunk)] for b in work]
        for fs in futures:
            x = np.concatenate([f.result() for f in fs])
            self.sess.run([OUTPUT_NAME], {INPUT_NAME: x})
        return batches * batch / (time.perf_counter() - t0)

    def close(self) -> None:
        self.pool.shutdown()


def model_figures(model, onnx: Path, x: torch.Tensor, rounds: int, repeats: int) -> dict:
    sess, eager = session(onnx), WithSoftmax(model).eval()
    out = {}
    for b in (1, 8):
        xb = x[:b].contiguous() if len(x) >= b else x[:1].repeat(b, 1, 1, 1)
        with torch.inference_mode():
            ms = _alternate({"ort": lambda: _timeit(lambda: sess.run([OUTPUT_NAME], {INPUT_NAME: xb.numpy()}), repeats) * 1e3,
                             "eager": lambda: _timeit(lambda: eager(xb), repeats) * 1e3}, rounds)
        out.update({f"ort_latency_ms_b{b}": ms["ort"], f"torch_eager_latency_ms_b{b}": ms["eager"],
                    f"ort_vs_eager_b{b}_speedup": ms["eager"] / ms["ort"]})
    return out


def int8_figures(export: Path, cfg, classes, data_root: Optional[Path], work: Path, quick: bool, rounds: int) -> dict:
    """Static QDQ int8 vs fp32, the TensorRT file (int8_trt_*) and the CPU file (int8_cpu_*, what a CPU repository
    serves): calibrated on training images, drift on the full test split (or the sample photos)."""
    if data_root is not None:
        calib, test = benchdata.split_files(data_root, "train"), benchdata.split_files(data_root, "test")
        source = f"{data_root}: train (calibration), full test split (drift)"
    else:
        photos = [work / "photos" / n for n in benchdata.sample_image_bytes()]
        for p, b in zip(photos, benchdata.photo_mix()):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b)
        calib, test, source = photos, photos, "sample photos (no data root: calibration and drift on 8 photos)"
    fp32, int8 = export / EXPORT_ONNX, export / EXPORT_INT8_ONNX
    out: dict = {"int8_data": source}
    for act in ("int8", "uint8"):  # int8: the TensorRT file (its rules checked while quantizing); uint8: the CPU file
        path = int8 if act == "int8" else export / EXPORT_INT8_CPU_ONNX
        r = quantize_int8(fp32, path, calib, cfg, n=64 if quick else 256, validation_images=[], activations=act)
        x = pixels(test, cfg)
        p32, p8 = predict(session(fp32), x), predict(session(path), x)
        labels = np.array([classes.index(p.parent.name) for p in test]) if data_root is not None else None
        d = drift(p32, p8, labels)
        lat = compare_latency(fp32, path, x[:16], batch_sizes=(1, 16), threads=torch.get_num_threads(), rounds=rounds,
                              repeats=5 if quick else 10)
        tag = "int8_trt" if act == "int8" else "int8_cpu"
        out.update({f"{tag}_quantize_s": r["quantize_seconds"], f"{tag}_vs_fp32_size_ratio": r["size_ratio"],
                    f"{tag}_test_images": d["images"], f"{tag}_top1_disagreement": d["top1_disagreement"]})
        if labels is not None:
            out.update({"fp32_test_top1": d["fp32_top1"], f"{tag}_test_top1": d["int8_top1"],
                        f"{tag}_top1_drop_points": d["top1_drop_points"]})
        for b in (1, 16):  # each variant against its own fp32 rounds (alternated with it)
            fp = f"{tag}_fp32"
            out.update({f"{fp}_latency_ms_b{b}": lat[f"fp32_latency_ms_b{b}"], f"{tag}_latency_ms_b{b}": lat[f"int8_latency_ms_b{b}"],
                        f"{tag}_vs_fp32_b{b}_speedup": lat[f"int8_vs_fp32_b{b}_speedup"]})
    out["fp32_onnx_mb"], out["int8_onnx_mb"] = fp32.stat().st_size / 1e6, int8.stat().st_size / 1e6
    out["int8_trt_tensorrt_rule_violations"] = len(check_tensorrt_qdq(int8))   # 0, or quantize_int8 had refused it
    out["int8_cpu_tensorrt_rule_violations"] = len(check_tensorrt_qdq(export / EXPORT_INT8_CPU_ONNX))  # > 0: CPU only
    return out


def served_figures(export: Path, data_root: Optional[Path], work: Path, rounds: int, concurrency: int = 16) -> dict:
    """Served int8 vs served fp32: the labelled test split through `classify` (the CPU repositories, as `serve
    repository --target cpu` / `--target int8` write them) at ``concurrency``, both servers up, alternated per round;
    img/s (medians of rounds) and top-1 of each."""
    if data_root is None or not (Path(data_root) / "test").is_dir():
        return {"served_note": "no labelled test split (pass --data-root or a trained checkpoint)"}
    test = Path(data_root) / "test"
    repos = {p: write_model_repository(export, work / f"served_{p}", "cpu", precision=p) for p in ("fp32", "int8")}
    rates: dict = {p: [] for p in repos}
    reports: dict = {}
    with TritonServer(repos["fp32"], ready_timeout=240) as s32, TritonServer(repos["int8"], ready_timeout=240) as s8:
        servers = {"fp32": s32, "int8": s8}
        for r in range(rounds + 1):   # round 0 warms both paths up and is not timed
            for p in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                t0 = time.perf_counter()
                reports[p] = evaluate_folder(servers[p].grpc_url, test, "grpc", concurrency=concurrency, progress=False)
                if r:
                    rates[p].append(reports[p]["images"] / (time.perf_counter() - t0))
    out = {"served_test_images": reports["fp32"]["images"], "served_concurrency": concurrency,
           "served_errors": reports["fp32"]["errors"] + reports["int8"]["errors"]}
    for p in repos:
        out[f"served_{p}_c{concurrency}_img_per_s"] = _median(rates[p])
        out[f"served_{p}_test_top1"] = reports[p]["top1"]
    out[f"served_int8_vs_fp32_c{concurrency}_speedup"] = (out[f"served_int8_c{concurrency}_img_per_s"]
                                                         / out[f"served_fp32_c{concurrency}_img_per_s"])
    out["served_int8_top1_drop_points"] = 100 * (out["served_fp32_test_top1"] - out["served_int8_test_top1"])
    return out


def triton_figures(export: Path, cfg, work: Path, precision: str, quick: bool, rounds: int) -> dict:
    """classify through tritonserver (our grpc.aio client and perf_analyzer) vs InProcess, alternated per round."""
    images, duration = benchdata.photo_mix(), (2.0 if quick else 4.0)
    onnx = export / (EXPORT_INT8_ONNX if precision == "int8" else EXPORT_ONNX)
    workers = cfg.serve.preprocess_instances
    repo = write_model_repository(export, work / f"repo_{precision}", "cpu", precision=precision)
    inproc, ours, perf = [], {c: [] for c in CONCURRENCIES}, {c: [] for c in CONCURRENCIES}
    local = InProcess(onnx, EvalSpec.from_data_config(cfg.data), workers)
    try:
        with TritonServer(repo, ready_timeout=240) as server:
            run_load(server.grpc_url, images, 4, duration_s=1.0, warmup_s=0.5)  # warm the whole path once
            local.throughput(images, 2)
            for r in range(rounds):
                def triton() -> None:
                    for c in CONCURRENCIES:
                        ours[c].append(run_load(server.grpc_url, images, c, duration_s=duration, warmup_s=0.5))
                        try:
                            perf[c].append(run_perf_analyzer(server.grpc_url, images, c, measurement_ms=int(duration * 1000),
                                                             max_trials=10))
                        except ServeError as err:  # an unstable window on a busy 2-core host: recorded, not fatal
                            print(f"[bench_serve] {err}", file=sys.stderr)
                steps = [lambda: inproc.append(local.throughput(images, 4 if quick else 8)), triton]
                for step in (steps if r % 2 == 0 else steps[::-1]):
                    step()
    finally:
        local.close()
    p = "" if precision == "fp32" else f"{precision}_"
    out = {f"{p}inprocess_b16_img_per_s": _median(inproc), f"{p}decode_workers_both_sides": workers}
    for c in CONCURRENCIES:
        for tag, runs in (("client", ours[c]), ("perf_analyzer", perf[c])):
            for key in ("throughput", "p50_ms", "p95_ms", "p99_ms"):
                out[f"{p}triton_{tag}_c{c}_{'img_per_s' if key == 'throughput' else key}"] = (
                    _median([x[key] for x in runs]) if runs else None)
        out[f"{p}triton_client_c{c}_errors"] = sum(x["errors"] for x in ours[c])
    out[f"{p}triton_vs_inprocess_c16_ratio"] = out[f"{p}triton_client_c16_img_per_s"] / out[f"{p}inprocess_b16_img_per_s"]
    if out[f"{p}triton_perf_analyzer_c16_img_per_s"] is not None:
        out[f"{p}triton_perf_analyzer_vs_inprocess_c16_ratio"] = (
            out[f"{p}triton_perf_analyzer_c16_img_per_s"] / out[f"{p}inprocess_b16_img_per_s"])
    return out


def run(out_dir: Path, quick: bool = False, checkpoint: Optional[str | Path] = None,
        data_root: Optional[str | Path] = None, sections: Sequence[str] = SECTIONS) -> dict:
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ServeError(f"unknown serving bench section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rounds = 2 if quick else 5
    work = Path(tempfile.mkdtemp(prefix="bench-serve-", dir=out_dir))
    try:
        ckpt = benchdata.checkpoint(work, checkpoint)
        model, cfg, classes = load_checkpoint(ckpt)
        spec = EvalSpec.from_data_config(cfg.data)
        if data_root is None and checkpoint is not None and Path(cfg.data.root, "test").is_dir():
            data_root = cfg.data.root  # a trained model: measure on its own data
        figures: dict = {"serve_checkpoint": str(checkpoint or "untrained demo-shaped SE-ResNet50"),
                         "serve_image_size": cfg.data.image_size, "serve_cpu_threads": torch.get_num_threads()}
        if "preprocess" in sections:
            figures.update(preprocess_costs(spec, rounds, 5 if quick else 20))
        if not set(sections) & {"model", "int8", "triton", "served"}:
            return figures
        export = work / "export"
        export_onnx(ckpt, export)
        if "model" in sections:
            x = torch.from_numpy(np.stack([eval_transform(spec)(decode_image(b, spec=spec)).numpy() for b in benchdata.photo_mix()]))
            figures.update(model_figures(model, export / EXPORT_ONNX, x, rounds, 5 if quick else 10))
        if "int8" in sections or "served" in sections or ("triton" in sections and not quick):
            figures.update(int8_figures(export, cfg, classes, Path(data_root) if data_root else None, work, quick, rounds))
        if "served" in sections:
            figures.update(served_figures(export, Path(data_root) if data_root else None, work, 2 if quick else 3))
        if "triton" in sections:
            for precision in ("fp32",) if quick else ("fp32", "int8"):
                try:
                    figures.update(triton_figures(export, cfg, work, precision, quick, rounds))
                except ServeError as err:  # recorded in bench.json/BENCHMARKS.md; the other figures still count
                    print(f"[bench_serve] Triton {precision}: {err}", file=sys.stderr)
                    figures[f"triton_{precision}_error"] = str(err).splitlines()[0][:300]
        figures = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in figures.items()}
        (out_dir / "bench_serve.json").write_text(json.dumps(figures, indent=2))
        return figures
    finally:
        shutil.rmtree(work, ignore_errors=True)  # ~200 MB of ONNX models and repositories


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    ck = next((a for a in sys.argv[1:] if not a.startswith("--")), None)
    print(json.dumps(run(Path("runs/bench"), quick=quick, checkpoint=ck), indent=2))
