"""The demo's stages as plain functions: prepare, train, export, serve_and_evaluate, report. ``scripts.demo`` chains
them; each can be called on its own (a notebook, another script)."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from scripts.prepare_animals import PrepareError
from scripts.prepare_animals import prepare as prepare_animals
from scripts.prepare_second import prepare as prepare_mnist
from serve.errors import ServeError
from serve.evaluate import evaluate_folder
from serve.export import export_onnx
from serve.repository import write_model_repository
from serve.server import TritonServer
from train.config import Config

ROOT = Path(__file__).resolve().parents[1]


class DemoError(RuntimeError):
    """Something the user can fix, in one sentence."""


def stage(name: str) -> None:
    print(f"\n=== {name} ===", flush=True)


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


def prepare(data_root: Path, max_per_class: int, dataset: str = "animals") -> tuple[dict, float]:
    """Animal-MNIST (or MNIST digits) as an ImageFolder (deduplicated, stratified split); skipped when prepared."""
    t0 = time.perf_counter()
    try:
        info = (prepare_animals if dataset == "animals" else prepare_mnist)(data_root, max_per_class=max_per_class)
    except PrepareError as err:
        raise DemoError(str(err)) from None
    return info, time.perf_counter() - t0


def guard_training_output(train_out: Path, data_info: dict, resume: bool) -> None:
    """A training output made from another split of the data is moved aside (no test image was ever trained on)."""
    record = train_out / "demo_data.json"
    if (train_out / "checkpoints").is_dir():
        try:
            before = json.loads(record.read_text()).get("split_digest")
        except (OSError, ValueError):
            before = None
        if before != data_info.get("split_digest"):
            old = train_out.with_name(train_out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            train_out.rename(old)
            print(f"{train_out} was trained on another split of the data (or one not recorded): moved it to {old} and "
                  "training from scratch, so that no test image was ever a training image", flush=True)
        elif resume:
            print(f"{train_out} has checkpoints: the trainer resumes from the last one (a finished run is only "
                  "re-evaluated); pass --fresh to start over", flush=True)
    train_out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"root": str(data_info.get("root", "")), "split_digest": data_info.get("split_digest"),
                                  "splits": data_info["splits"]}, indent=2))


def train(config: str, overrides: list[str], nproc: int, cfg: Config) -> tuple[dict, float]:
    """``python -m launch local --nproc N -- --config ...``; returns the trainer's report.json and the wall time."""
    train_out = Path(cfg.output_dir)
    stale = train_out / "report.json"
    stale.unlink(missing_ok=True)  # never mistake a previous run's report for this one's
    cmd = [sys.executable, "-m", "launch", "local", "--nproc", str(nproc), "--", "--config", config]
    for o in overrides:
        cmd += ["--set", o]
    print("+ " + shlex.join(cmd), flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise DemoError(f"Training failed with exit code {rc}; its message is above (rerun to resume from the last "
                        "checkpoint).")
    try:
        report = json.loads(stale.read_text())
    except (OSError, ValueError):
        raise DemoError(f"Training finished but wrote no readable '{stale}'.") from None
    if not (train_out / "checkpoints" / "best.pt").is_file():
        raise DemoError(f"Training finished without '{train_out / 'checkpoints' / 'best.pt'}'; rerun with --fresh.")
    return report, wall


def export(best: Path, out: Path) -> tuple[dict, Path, float]:
    """ONNX (parity-checked against PyTorch) into OUT/export, then a CPU Triton repository written from that folder."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    try:
        exp = export_onnx(best, out / "export")
        repo = write_model_repository(out / "export", out / "model_repository", target="cpu")
    except ServeError as err:
        raise DemoError(str(err)) from None
    return exp, repo, time.perf_counter() - t0


def serve_and_evaluate(repo: Path, test_dir: Path, out: Path, concurrency: int) -> dict:
    """Start the local tritonserver and score the test split through `classify` over gRPC (`python -m serve evaluate`)."""
    t0 = time.perf_counter()
    log_path = out / "tritonserver.log"
    try:
        with TritonServer(repo, log_path=log_path) as server:
            start_s = time.perf_counter() - t0
            print(f"tritonserver ready in {start_s:.1f} s: grpc {server.grpc_url}, http {server.http_url}, "
                  f"metrics {server.metrics_url}", flush=True)
            t1 = time.perf_counter()
            result = evaluate_folder(server.grpc_url, test_dir, "grpc", out / "served", concurrency=concurrency)
            classify_s = time.perf_counter() - t1
            try:
                with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
                    (out / "triton_metrics.txt").write_text(r.read().decode(errors="replace"))
            except OSError as err:
                print(f"warning: could not read Triton metrics: {err}", file=sys.stderr)
    except ServeError as err:
        raise DemoError(str(err)) from None
    result.update(server_start_seconds=round(start_s, 2), classify_seconds=round(classify_s, 2), log=str(log_path))
    return result


def summary(report: dict, served: dict, trainer: dict, out: Path) -> None:
    stage("summary")
    budget = f", budget {report['time_budget']}" if report.get("time_budget") else ""
    if report["trained_this_run"]:
        print(f"trained {report['epochs']} epochs in {report['train_seconds']:.0f} s ({report['world_size']} ranks, "
              f"{report['precision']}, {report['train_images_per_second']} img/s{budget})")
    else:
        print(f"training was already complete ({report['epochs']} epochs): re-evaluated only")
    print(f"test top-1 through Triton (gRPC): {100 * report['test_top1']:.2f}% ({report['test_correct']}/"
          f"{report['test_images']})   PyTorch (trainer): {100 * (trainer.get('test_top1') or 0):.2f}%   "
          f"val: {100 * (trainer.get('val_top1') or 0):.2f}%")
    print("per-class recall: " + ", ".join(f"{c} {100 * v['recall']:.1f}%" for c, v in served["per_class"].items()))
    lat = served["latency_ms"]
    if lat:
        print(f"latency per image (client, concurrency {served['concurrency']}): p50 {lat['p50']:.1f} ms, "
              f"p95 {lat['p95']:.1f} ms, p99 {lat['p99']:.1f} ms; {served['images_per_second']} img/s")
    if served["errors"]:
        f = served["failures"][0]
        print(f"{served['errors']} request(s) failed, e.g. {f['path']}: {f['error']}", file=sys.stderr)
    st = report["stage_seconds"]
    print(f"total {report['total_seconds']:.0f} s (" + ", ".join(f"{k} {v:.0f}" for k, v in st.items()) + ")")
    print(f"report: {out / 'report.json'}   confusion matrix: {report['files']['confusion_png']}")
