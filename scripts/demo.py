"""``make demo``: Animal-MNIST from the installed package to a Triton-served classifier, measured over gRPC.

Stages: prepare the data (``scripts.prepare_animals``) -> train SE-ResNet50 with ``configs/demo.yaml`` under
``python -m launch local --nproc 2`` (DDP over gloo on CPU) -> export ONNX (parity-checked) and write the Triton
repository from ``<output_dir>/checkpoints/best.pt`` -> start the local tritonserver, classify every held-out test
image through the ``classify`` ensemble over gRPC -> ``<out>/report.json``, a confusion matrix of the served
predictions, and a summary. Reruns reuse the prepared data and resume the training output (a finished run is only
re-evaluated).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/demo.yaml"
QUICK_MAX_PER_CLASS = 24
# --quick: a tiny end-to-end pass (a handful of steps on 24 unique images per class) that checks the wiring, not accuracy.
QUICK_OVERRIDES = ["train.max_steps=3", "data.batch_size=8", "train.checkpoint_every_steps=0", "train.log_every_steps=1"]


class DemoError(RuntimeError):
    """Something the user can fix, in one sentence."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scripts.demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "The main job (`make demo`). 1) Prepares Animal-MNIST from the installed animal-mnist==0.4 package as an\n"
            "ImageFolder (exact duplicates removed before a stratified train/val/test split; skipped when already\n"
            "prepared). 2) Trains SE-ResNet50 with the config under `python -m launch local --nproc N` (DDP); a rerun\n"
            "resumes the training output, and a finished training is only re-evaluated. 3) Exports ONNX and writes a\n"
            "CPU Triton model repository from <output_dir>/checkpoints/best.pt. 4) Starts the local tritonserver,\n"
            "classifies every test image through the `classify` ensemble over gRPC, stops the server, and writes\n"
            "OUT/report.json (test_top1 measured through Triton, the trainer's own PyTorch test_top1, per-class\n"
            "recall, latency percentiles, timings) and OUT/confusion_served.png."),
        epilog=("examples:\n"
                "  python -m scripts.demo                       # full run (20-30 minutes on a 2-core CPU, longer when shared)\n"
                "  python -m scripts.demo --quick               # wiring check on a tiny subset (a few minutes)\n"
                "  python -m scripts.demo --set train.epochs=2  # any trainer config override\n"))
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"training config (default {DEFAULT_CONFIG})")
    p.add_argument("--data", default=None, help="where the ImageFolder is prepared (default: the config's data.root, "
                                                "or data/animals-quick with --quick)")
    p.add_argument("--out", default=None, help="demo output folder for report.json, the model repository and the "
                                               "training output in OUT/train (default runs/demo, or runs/demo-quick with --quick)")
    p.add_argument("--nproc", type=int, default=2, help="training processes (torchrun DDP ranks; default 2)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent gRPC requests while classifying (default 8)")
    p.add_argument("--max-per-class", type=int, default=None,
                   help=f"prepare only the first N unique images per class (default all; {QUICK_MAX_PER_CLASS} with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="tiny subset and 3 training steps (" + " ".join(QUICK_OVERRIDES) + "): checks every stage, "
                        "not accuracy")
    p.add_argument("--fresh", action="store_true", help="train from scratch (train.resume=false) instead of resuming")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="trainer config override, repeatable (applied after the demo's own settings)")
    return p


# ------------------------------------------------------------------------------------------------ helpers


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def metrics_base_port(preferred: int, nproc: int) -> int:
    """``preferred`` if it and the next nproc-1 ports are free, else the first free run of ports above it (0 stays 0)."""
    if preferred == 0:
        return 0
    for base in range(preferred, min(preferred + 200, 65535 - nproc)):
        if all(_port_free(base + i) for i in range(nproc)):
            return base
    return 0


def percentiles(values: list[float]) -> dict:
    import numpy as np

    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    return {"p50": round(float(np.percentile(a, 50)), 2), "p95": round(float(np.percentile(a, 95)), 2),
            "p99": round(float(np.percentile(a, 99)), 2), "mean": round(float(a.mean()), 2),
            "max": round(float(a.max()), 2)}


def _stage(name: str) -> None:
    print(f"\n=== {name} ===", flush=True)


# ------------------------------------------------------------------------------------------------ stages


def run_training(config: str, overrides: list[str], nproc: int) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "launch", "local", "--nproc", str(nproc), "--", "--config", config]
    for o in overrides:
        cmd += ["--set", o]
    print("+ " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    return time.perf_counter() - t0, rc


def classify_test_split(repo: Path, test_dir: Path, classes: list[str], out: Path, concurrency: int) -> dict:
    import numpy as np
    from serve.client import classify_files
    from serve.server import TritonServer

    t0 = time.perf_counter()
    log_path = out / "tritonserver.log"
    with TritonServer(repo, log_path=log_path) as server:
        start_s = time.perf_counter() - t0
        print(f"tritonserver ready in {start_s:.1f} s: grpc {server.grpc_url}, http {server.http_url}, "
              f"metrics {server.metrics_url}", flush=True)
        t1 = time.perf_counter()
        results = classify_files([test_dir], server.grpc_url, "grpc", k=3, concurrency=concurrency, progress=True)
        classify_s = time.perf_counter() - t1
        metrics_text = ""
        try:
            import urllib.request
            with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
                metrics_text = r.read().decode(errors="replace")
        except OSError as err:
            print(f"warning: could not read Triton metrics: {err}", file=sys.stderr)
        grpc_url = server.grpc_url
    (out / "triton_metrics.txt").write_text(metrics_text)
    index = {c: i for i, c in enumerate(classes)}
    n = len(classes)
    confusion = np.zeros((n, n), dtype=np.int64)
    failed, rows = [], []
    for r in results:
        truth = Path(r.path).parent.name
        if truth not in index:
            raise DemoError(f"Test image '{r.path}' is in a folder that is not one of the model's classes.")
        pred = r.top[0].label if r.ok and r.top else None
        if pred is None:
            failed.append({"path": r.path, "error": r.error})
        elif pred in index:
            confusion[index[truth], index[pred]] += 1
        rows.append({"path": r.path, "label": truth, "predicted": pred, "score": r.top[0].score if r.top else None,
                     "latency_ms": round(r.latency_ms, 3), "error": r.error})
    (out / "classifications.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    correct = int(np.trace(confusion))
    return {"results": results, "confusion": confusion, "correct": correct, "failed": failed,
            "server_start_seconds": round(start_s, 2), "classify_seconds": round(classify_s, 2),
            "grpc_url": grpc_url, "log": str(log_path)}


def run(args: argparse.Namespace) -> int:
    from train.config import ConfigError, load_config

    t_start = time.perf_counter()
    out = Path(args.out or ("runs/demo-quick" if args.quick else "runs/demo"))
    max_per_class = args.max_per_class if args.max_per_class is not None else (QUICK_MAX_PER_CLASS if args.quick else 0)
    if max_per_class < 0:
        raise DemoError("--max-per-class must be 0 (all images) or a positive number.")
    if args.nproc < 1:
        raise DemoError("--nproc must be at least 1.")
    if args.concurrency < 1:
        raise DemoError("--concurrency must be at least 1.")
    if not (ROOT / args.config).is_file() and not Path(args.config).is_file():
        raise DemoError(f"Config file '{args.config}' does not exist; pass --config with a YAML file such as {DEFAULT_CONFIG}.")
    config = args.config if Path(args.config).is_file() else str(ROOT / args.config)
    try:
        base_cfg = load_config(config, args.overrides)
    except ConfigError as err:
        raise DemoError(str(err)) from None
    data_root = Path(args.data or ("data/animals-quick" if args.quick else base_cfg.data.root))

    # ---- 1. data
    _stage("1/4 data: Animal-MNIST, deduplicated, stratified split")
    from scripts.prepare_animals import PrepareError, prepare
    t0 = time.perf_counter()
    try:
        data_info = prepare(data_root, max_per_class=max_per_class)
    except PrepareError as err:
        raise DemoError(str(err)) from None
    prepare_s = time.perf_counter() - t0

    # ---- 2. training
    overrides = [f"data.root={data_root}", f"output_dir={out / 'train'}"]
    if args.quick:
        overrides += QUICK_OVERRIDES
    if args.fresh:
        overrides.append("train.resume=false")
    pre = load_config(config, overrides + args.overrides)  # resolved as the trainer will see it (user --set wins)
    port = metrics_base_port(pre.metrics.port, args.nproc) if pre.metrics.enabled else pre.metrics.port
    if pre.metrics.enabled and port != pre.metrics.port:
        overrides.append(f"metrics.port={port}")
    cfg = load_config(config, overrides + args.overrides)
    train_out = Path(cfg.output_dir)
    _stage(f"2/4 training: {cfg.model.name} under {args.nproc} torchrun processes ({cfg.engine}), output {train_out}")
    if cfg.metrics.enabled:
        where = (", ".join(f"http://{cfg.metrics.address}:{cfg.metrics.port + r}/metrics" for r in range(args.nproc))
                 if cfg.metrics.port else "free ports (see the log)")
        print(f"training metrics (Prometheus, while training runs): {where}", flush=True)
    data_record = train_out / "demo_data.json"
    if (train_out / "checkpoints").is_dir():
        try:
            before = json.loads(data_record.read_text()).get("split_digest")
        except (OSError, ValueError):
            before = None
        if before != data_info.get("split_digest"):
            old = train_out.with_name(train_out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            train_out.rename(old)
            print(f"{train_out} was trained on another split of the data (or one not recorded): moved it to {old} and "
                  "training from scratch, so that no test image was ever a training image", flush=True)
        elif cfg.train.resume:
            print(f"{train_out} has checkpoints: the trainer resumes from the last one (a finished run is only "
                  "re-evaluated); pass --fresh to start over", flush=True)
    train_out.mkdir(parents=True, exist_ok=True)
    data_record.write_text(json.dumps({"root": str(data_root), "split_digest": data_info.get("split_digest"),
                                       "splits": data_info["splits"]}, indent=2))
    stale = train_out / "report.json"
    stale.unlink(missing_ok=True)  # never mistake a previous run's report for this one's
    train_wall, rc = run_training(config, overrides + args.overrides, args.nproc)
    if rc != 0:
        raise DemoError(f"Training failed with exit code {rc}; its message is above (rerun to resume from the last "
                        "checkpoint).")
    try:
        trainer = json.loads(stale.read_text())
    except (OSError, ValueError):
        raise DemoError(f"Training finished but wrote no readable '{stale}'.") from None
    best = train_out / "checkpoints" / "best.pt"
    if not best.is_file():
        raise DemoError(f"Training finished without '{best}'; rerun with --fresh.")

    # ---- 3. export + repository
    _stage("3/4 export: ONNX (parity-checked against PyTorch) and the Triton model repository (CPU target)")
    from serve.errors import ServeError
    from serve.export import export_onnx
    from serve.repository import write_model_repository
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    try:
        exp = export_onnx(best, out / "export")
        repo = write_model_repository(best, out / "model_repository", target="cpu",
                                      onnx_path=out / "export" / "model.onnx")
    except ServeError as err:
        raise DemoError(str(err)) from None
    export_s = time.perf_counter() - t0
    print(f"ONNX {exp['onnx']} (max |ONNX - PyTorch| {exp['parity']['max_abs_diff']:.1e}); repository {repo}", flush=True)

    # ---- 4. serve + classify
    _stage("4/4 serving: local tritonserver, every test image through the `classify` ensemble over gRPC")
    classes = list(trainer["classes"])
    test_dir = data_root / "test"
    try:
        served = classify_test_split(repo, test_dir, classes, out, args.concurrency)
    except ServeError as err:
        raise DemoError(str(err)) from None

    from train.evaluate import per_class, plot_confusion
    conf = served["confusion"]
    n_test = len(served["results"])
    top1 = served["correct"] / max(n_test, 1)
    pc = per_class(conf, classes)
    conf_png = out / "confusion_served.png"
    plot_confusion(conf, classes, conf_png, f"served (Triton gRPC) test: top-1 {100 * top1:.2f}% ({n_test} images)")
    lat = percentiles([r.latency_ms for r in served["results"] if r.ok])
    total_s = time.perf_counter() - t_start
    report = {
        "test_top1": round(top1, 5),
        "test_images": n_test,
        "test_correct": served["correct"],
        "failed_requests": len(served["failed"]),
        "train_seconds": round(train_wall, 2),
        "total_seconds": round(total_s, 2),
        "serving": "triton",
        "protocol": "grpc",
        "model_repository": str(repo),
        "trainer_test_top1": trainer.get("test_top1"),
        "trainer_val_top1": trainer.get("val_top1"),
        "trainer_train_seconds": trainer.get("train_seconds"),
        "trainer_resumed": trainer.get("resumed"),
        "trained_this_run": bool(trainer.get("train_seconds")),
        "epochs": trainer.get("epochs"),
        "steps": trainer.get("steps"),
        "precision": trainer.get("precision"),
        "world_size": trainer.get("world_size"),
        "data_backend": trainer.get("data_backend"),
        "train_images_per_second": trainer.get("train_images_per_second"),
        "classes": classes,
        "test_recall": {c: v["recall"] for c, v in pc.items()},
        "test_per_class": pc,
        "test_confusion": conf.tolist(),
        "latency_ms": lat,
        "classify_images_per_second": round(n_test / max(served["classify_seconds"], 1e-9), 2),
        "concurrency": args.concurrency,
        "stage_seconds": {"prepare": round(prepare_s, 2), "train": round(train_wall, 2), "export": round(export_s, 2),
                          "server_start": served["server_start_seconds"], "classify": served["classify_seconds"]},
        "data": {"root": str(data_root), "splits": data_info["splits"],
                 "duplicates_removed": data_info["duplicates_removed"], "max_per_class": max_per_class},
        "config": str(Path(config).resolve().relative_to(ROOT)) if Path(config).resolve().is_relative_to(ROOT) else config,
        "overrides": overrides + args.overrides,
        "files": {"confusion_png": str(conf_png), "classifications": str(out / "classifications.jsonl"),
                  "triton_metrics": str(out / "triton_metrics.txt"), "tritonserver_log": served["log"],
                  "trainer_report": str(stale), "trainer_metrics": str(train_out / "metrics.jsonl"),
                  "best_checkpoint": str(best), "onnx": exp["onnx"]},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))

    # ---- summary
    _stage("summary")
    trained = (f"trained {report['epochs']} epochs in {train_wall:.0f} s ({report['world_size']} ranks, "
               f"{report['precision']}, {report['train_images_per_second']} img/s)" if report["trained_this_run"]
               else f"training was already complete ({report['epochs']} epochs): re-evaluated only, {train_wall:.0f} s")
    print(f"{trained}")
    print(f"test top-1 through Triton (gRPC): {100 * top1:.2f}% ({served['correct']}/{n_test})"
          f"   PyTorch (trainer): {100 * (trainer.get('test_top1') or 0):.2f}%   val: {100 * (trainer.get('val_top1') or 0):.2f}%")
    print("per-class recall: " + ", ".join(f"{c} {100 * v['recall']:.1f}%" for c, v in pc.items()))
    if lat:
        print(f"latency per image (client, concurrency {args.concurrency}): p50 {lat['p50']:.1f} ms, "
              f"p95 {lat['p95']:.1f} ms, p99 {lat['p99']:.1f} ms; {report['classify_images_per_second']} img/s")
    if served["failed"]:
        print(f"{len(served['failed'])} request(s) failed, e.g. {served['failed'][0]['path']}: "
              f"{served['failed'][0]['error']}", file=sys.stderr)
    print(f"total {total_s:.0f} s (prepare {prepare_s:.0f}, train {train_wall:.0f}, export {export_s:.0f}, "
          f"server start {served['server_start_seconds']:.0f}, classify {served['classify_seconds']:.0f})")
    print(f"report: {out / 'report.json'}   confusion matrix: {conf_png}")
    print(f"metrics: {train_out / 'metrics.jsonl'} (training), {out / 'triton_metrics.txt'} (Triton /metrics snapshot); "
          f"trainer report: {stale}")
    return 1 if served["failed"] else 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # paths given by the user are relative to where they ran the command; the demo then works from the repository root
    for name in ("data", "out"):
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    if Path(args.config).is_file():
        args.config = os.path.abspath(args.config)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    try:
        return run(args)
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; rerun to continue (prepared data and training checkpoints are reused).", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
