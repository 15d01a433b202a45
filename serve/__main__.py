"""`python -m serve`: export, quantize, trt, repository, up, classify, evaluate. User errors end in one sentence and exit code 2."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from serve.errors import ServeError, run_command


def _export(a) -> int:
    from serve.export import export_onnx

    r = export_onnx(a.checkpoint, a.out, images=a.images or None, atol=a.atol)
    p = r["parity"]
    print(f"[export] {r['onnx']} ({r['onnx_bytes'] / 1e6:.1f} MB, opset {r['opset']}); parity on {p['images']} images: "
          f"max |ONNX - PyTorch| {p['max_abs_diff']:.2e} (tolerance {p['atol']:.0e}), top-1 agreement {p['top1_agreement']:.3f}")
    return 0


def _quantize(a) -> int:
    """Static QDQ int8 of an export folder's model.onnx (serve/quantize.py), calibrated on real images: model.int8.onnx
    for TensorRT (its rules checked before the file is written) and/or model.int8.cpu.onnx for CPUs."""
    from serve.contract import INT8_TARGETS
    from serve.images import find_images

    images = find_images(a.calib_images)
    if not images:
        raise ServeError("no calibration images found; pass training images (files or folders) with --calib-images.")
    val = find_images(a.val_images) if a.val_images else None
    if a.val_images and not val:
        raise ServeError("no validation images found in --val-images; pass image files or folders (e.g. data/animals/val).")
    try:
        from serve.quantize import quantize_export
    except ImportError as err:
        raise ServeError(f"int8 quantization is not available here ({err}); install the 'export' extra.") from None
    targets = INT8_TARGETS if a.target == "all" else (a.target,)
    kwargs = {"max_disagreement": a.max_drift} if a.max_drift is not None else {}
    for target, report in quantize_export(a.export, images, targets, n=a.n, validation_images=val, **kwargs).items():
        checked = report.get("validation", {})
        shown = {k: x for k, x in report.items() if isinstance(x, (int, float, str)) and not k.startswith("onnx_")}
        shown.update({k: round(x, 4) for k, x in checked.items() if k in ("images", "top1_disagreement", "fp32_top1", "int8_top1")})
        print(f"[quantize] {report['onnx_int8']} ({target}): " + ", ".join(f"{k} {x}" for k, x in shown.items()))
    print(f"[quantize] serve it with: python -m serve repository --export {a.export} --target int8 --out DIR "
          "(CPU); TensorRT plans: python -m serve trt --onnx DIR/model.int8.onnx --precision int8")
    return 0


def _trt(a) -> int:
    from serve.contract import plan_filename
    from serve.tensorrt import build_plan, onnx_image_size, plan_source, profile_for_onnx, trtexec_command

    mn, opt, mx = profile_for_onnx(a.onnx, a.max_batch)   # the one profile rule (serve.tensorrt.plan_profile)
    cmd = trtexec_command(plan_source(a.onnx, a.precision, a.out), Path(a.out) / plan_filename("<CC>").replace("sm<CC>", "sm${CC}"),
                          a.precision, mn, opt, mx, image_size=onnx_image_size(a.onnx), workspace_mib=a.workspace_mib)
    print("[trt] equivalent trtexec command (what the Kubernetes init container runs):")
    print("  " + shlex.join(cmd).replace("'", "") + "    # ${CC}: the GPU's compute capability without the dot, e.g. 80")
    if a.print_only:
        return 0
    r = build_plan(a.onnx, a.out, a.precision, mn, opt, mx, a.workspace_mib)
    print(f"[trt] {r['plan']} (compute capability {r['compute_capability']}, {r['precision']}, {r['seconds']} s)")
    return 0


def _repository(a) -> int:
    if bool(a.export) == bool(a.checkpoint):
        raise ServeError("pass exactly one of --export (a folder from 'python -m serve export') or --checkpoint.")
    from serve.repository_versions import write_versioned_repository

    out = write_versioned_repository(a.export or a.checkpoint, a.out, version=a.version, version_policy=a.version_policy,
                                     serve_overrides=a.overrides, target=a.target, precision=a.precision, onnx_path=a.onnx,
                                     plan=a.plan, plan_cc=a.plan_cc, ort_tensorrt=a.ort_tensorrt, ort_threads=a.ort_threads,
                                     preprocess=a.preprocess, max_queue_size=a.max_queue_size, queue_timeout_ms=a.queue_timeout_ms)
    meta = json.loads((out / "repository.json").read_text())
    print(f"[repository] {out} (target {meta['target']}, {meta['precision']}): models {', '.join(meta['models'])}; "
          f"{meta['models'][0]} versions {meta['versions']} ({meta['version_policy']}); "
          f"serve it with: seresnet serve up --repository {a.out}")
    return 0


def _up(a) -> int:
    from serve.server import run_foreground

    return run_foreground(a.repository, a.http_port, a.grpc_port, a.metrics_port, a.ready_timeout)


def _classify(a) -> int:
    from serve.client import classify_files

    results = classify_files(a.images, a.url, a.protocol, a.k, a.model, a.concurrency, progress=not a.no_progress,
                             max_attempts=a.max_attempts, timeout_s=a.timeout)
    failed = 0
    for r in results:
        if r.ok:
            tops = "  ".join(f"{p.label} {p.score:.3f}" for p in r.top)
            print(f"{r.path}\t{tops}\t({r.latency_ms:.1f} ms)")
        else:
            failed += 1
            print(f"{r.path}\tERROR: {r.error}")
    if a.json:
        Path(a.json).write_text(json.dumps([{"path": r.path, "error": r.error, "latency_ms": r.latency_ms,
                                             "top": [p.__dict__ for p in r.top]} for r in results], indent=2))
    if failed:
        print(f"[classify] {failed} of {len(results)} images failed", file=sys.stderr)
    return 1 if failed else 0


def _evaluate(a) -> int:
    from serve.evaluate import evaluate_folder, format_report

    r = evaluate_folder(a.url, a.folder, a.protocol, a.out, model=a.model, concurrency=a.concurrency,
                        progress=not a.no_progress, max_attempts=a.max_attempts, timeout_s=a.timeout)
    print(format_report(r))
    return 0


DESCRIPTION = ("Serve SE-ResNet50: export to ONNX/TensorRT, write a Triton model repository, run a local tritonserver, "
               "classify images.")


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m serve", description=DESCRIPTION)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    e = sub.add_parser("export", help="ONNX (opset 17, dynamic batch) + onnx.checker + parity against PyTorch on real images.")
    e.add_argument("--checkpoint", required=True, help="a seresnet-stack checkpoint (e.g. runs/demo/train/checkpoints/best.pt)")
    e.add_argument("--out", required=True, help="export folder: model.onnx, labels.txt, serving_spec.json, export_report.json")
    e.add_argument("--images", nargs="*", default=[], help="parity images (files or folders; default: scikit-image sample photos)")
    e.add_argument("--atol", type=float, default=1e-4, help="largest |ONNX - PyTorch| probability difference accepted (default 1e-4)")
    e.set_defaults(func=_export)

    q = sub.add_parser("quantize", help="Static int8 (QDQ) of an export folder's model.onnx, calibrated on real images -> "
                       "model.int8.onnx (TensorRT) and model.int8.cpu.onnx (CPU).")
    q.add_argument("--export", required=True, help="export folder from 'export' (model.onnx, serving_spec.json)")
    q.add_argument("--calib-images", nargs="+", required=True, help="calibration images: training files or folders")
    q.add_argument("--n", type=int, default=256, help="calibration images used (default 256)")
    q.add_argument("--target", choices=("all", "cpu", "tensorrt"), default="all",
                   help="tensorrt: model.int8.onnx, symmetric int8 with float biases, checked against TensorRT's Q/DQ "
                        "rules; cpu: model.int8.cpu.onnx, uint8 activations, the fastest on CPUs (ONNX Runtime), "
                        "refused by TensorRT; all (default): both")
    q.add_argument("--val-images", nargs="+", help="validation images (files or folders, e.g. data/animals/val; labels from "
                   "class-named folders): fp32 vs int8 top-1 (default: up to 256 training images not used for calibration)")
    q.add_argument("--max-drift", type=float, default=None,
                   help="largest fraction of validation images whose top-1 may change (default 0.02); more fails")
    q.set_defaults(func=_quantize)

    t = sub.add_parser("trt", help="Build a TensorRT plan named for this GPU's compute capability (needs tensorrt and a GPU); prints the trtexec equivalent.")
    t.add_argument("--onnx", required=True, help="model.onnx from 'export'")
    t.add_argument("--out", default=".", help="folder for model.sm<CC>.plan (default: current folder)")
    t.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp16",
                   help="fp16: built from an fp16-typed copy of the ONNX (written beside the plan; TensorRT 11 has no "
                        "--fp16); int8 needs the Q/DQ model of 'quantize' (model.int8.onnx); default fp16")
    t.add_argument("--max-batch", type=int, default=None,
                   help="largest batch (default: serve.max_batch_size of the serving_spec.json beside the ONNX, as the "
                        "repository's config says); the profile is min 1, opt the largest preferred size, max this")
    t.add_argument("--workspace-mib", type=int, default=4096)
    t.add_argument("--print-only", action="store_true", help="only print the trtexec command")
    t.set_defaults(func=_trt)

    r = sub.add_parser("repository", help="Write a self-contained Triton model repository: se_resnet50, preprocess, the classify ensemble.")
    r.add_argument("--export", help="an export folder from 'export' (model.onnx [+ the int8 files of 'quantize'], serving_spec.json, labels.txt)")
    r.add_argument("--checkpoint", help="convenience: a seresnet-stack checkpoint, exported first (with the parity check)")
    r.add_argument("--out", required=True, help="new, empty, or earlier-written repository folder (e.g. runs/model_repository)")
    r.add_argument("--target", choices=["cpu", "onnx", "tensorrt", "int8"], default="cpu",
                   help="cpu: python backend + ONNX Runtime (local tritonserver); onnx: onnxruntime_onnx; tensorrt: tensorrt_plan; "
                        "int8: cpu serving model.int8.cpu.onnx (default cpu)")
    r.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                   help="int8: serve the export folder's int8 file for the target: model.int8.cpu.onnx on cpu, model.int8.onnx "
                        "(TensorRT's Q/DQ rules checked) on onnx and tensorrt (default fp32)")
    r.add_argument("--onnx", help="serve this ONNX file instead of the export folder's")
    r.add_argument("--plan", help="tensorrt: copy this plan (from 'trt') into the repository")
    r.add_argument("--plan-cc", help="tensorrt: compute capability the plan was built for, e.g. 8.0")
    r.add_argument("--ort-tensorrt", action="store_true", help="onnx: enable ONNX Runtime's TensorRT accelerator with an engine cache")
    r.add_argument("--ort-threads", type=int, default=0, help="cpu: ONNX Runtime intra-op threads (0 = all cores)")
    r.add_argument("--preprocess", choices=["python", "dali"], default="python",
                   help="python: PIL decode + the training eval transform (any target); dali (onnx, tensorrt): a python "
                        "guard checks each request, then DALI decodes on the GPU (nvJPEG) with the trainer's DALI eval "
                        "graph (default python)")
    r.add_argument("--max-queue-size", type=int, default=None,
                   help="requests each batched model may hold waiting before it rejects more at once (UNAVAILABLE / 503), "
                        "the memory backstop (default: 512 MiB of the largest request for preprocess and guard, "
                        "4 x max_batch_size for the classifier)")
    r.add_argument("--queue-timeout-ms", type=int, default=None,
                   help="a request waiting longer than this in a model's queue is rejected: how load is shed (default 2000)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="serve.KEY=VALUE",
                   help="override a serving setting the checkpoint froze, repeatable: serve.max_batch_size, "
                        "serve.preferred_batch_sizes, serve.max_queue_delay_us, serve.instances, serve.preprocess_instances, "
                        "serve.max_image_bytes, serve.max_image_pixels, serve.max_request_bytes")
    r.add_argument("--version", type=int, default=1,
                   help="write the classifier as this version folder (se_resnet50/N/); the versions already in --out stay")
    r.add_argument("--version-policy", help="which versions Triton loads: latest:N, all or specific:V1,V2 (default: "
                                            "Triton's latest:1)")
    r.set_defaults(func=_repository)

    u = sub.add_parser("up", help="Run tritonserver in the foreground on 127.0.0.1 until SIGTERM; exits 3 when a python stub "
                                  "dies (Triton does not restart it), for a supervisor to start it again.")
    u.add_argument("--repository", required=True, help="a repository written by 'repository'")
    u.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000; 0 = a free port)")
    u.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001; 0 = a free port)")
    u.add_argument("--metrics-port", type=int, default=8002, help="Prometheus /metrics port (default 8002; 0 = a free port)")
    u.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for all models to be ready (default 180)")
    u.set_defaults(func=_up)

    c = sub.add_parser("classify", help="Top-k labels and scores for images (sent concurrently, with bounded retries).")
    c.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    c.add_argument("--url", default="127.0.0.1:8001", help="server HOST:PORT (default 127.0.0.1:8001, the gRPC port)")
    c.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    c.add_argument("-k", type=int, default=5, help="labels per image (default 5)")
    c.add_argument("--model", default="classify", help="model to ask (default: the classify ensemble, which takes encoded bytes)")
    c.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    c.add_argument("--max-attempts", type=int, default=6, help="attempts per image on transient errors (default 6)")
    c.add_argument("--timeout", type=float, default=60.0,
                   help="seconds one request may take before it counts as failed (and is retried, as a transient error) "
                        "(default 60)")
    c.add_argument("--json", help="also write the results to this JSON file")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=_classify)
    v = sub.add_parser("evaluate", help="Score a labelled <class>/<image> folder through a running server: top-1/top-5, per-class recall, latency percentiles, report.json + confusion PNG.")
    v.add_argument("folder", metavar="FOLDER", help="ImageFolder-style folder: <class>/<image> (class folders named as the model's labels)")
    v.add_argument("--url", default="127.0.0.1:8001", help="server HOST:PORT (default 127.0.0.1:8001, the gRPC port)")
    v.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    v.add_argument("--out", help="folder for report.json, confusion.json and confusion.png")
    v.add_argument("--model", default="classify", help="model to ask (default: the classify ensemble)")
    v.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    v.add_argument("--max-attempts", type=int, default=6, help="attempts per image on transient errors (default 6)")
    v.add_argument("--timeout", type=float, default=60.0,
                   help="seconds one request may take before it counts as failed (and is retried, as a transient error) "
                        "(default 60)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    v.set_defaults(func=_evaluate)
    return p


def register(sub) -> None:
    """``seresnet serve <verb>``."""
    build_parser(sub.add_parser("serve", help="export, quantize, trt, repository, up, classify, evaluate (Triton)",
                                description=DESCRIPTION)).set_defaults(run=lambda args, _rest: run(args))


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
