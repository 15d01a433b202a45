"""`seresnet evaluate`: score a labelled folder (`<class>/<image>`) with no server, from a checkpoint (PyTorch) or an
exported ONNX file (ONNX Runtime), through the same eval transform the server's preprocess runs.

``DIR/report.json`` has the keys ``serve evaluate`` writes (top1, top5, per_class, confusion, errors, ...) plus
``test_top1``/``test_top5``/``test_images`` (the trainer's names) and a ``provenance`` block; confusion.json and
confusion.png sit beside it. An image that cannot be decoded is an error (listed under ``failures``), never a miss."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from serve.errors import ServeError, run_command
from serve.evaluate import labelled_files, write_report_files
from serve.export import load_checkpoint, ort_session, read_export
from train.evaluate import per_class
from train.provenance import config_fingerprint, listing_fingerprint, provenance
from train.transforms import EvalSpec, ImageDecodeError, decode_image, eval_transform

log = logging.getLogger(__name__)


@dataclass
class Scorer:
    """What scoring needs from a model file: its classes, eval spec, input limits and a batch -> probabilities call."""
    source: dict
    classes: list[str]
    spec: EvalSpec
    max_bytes: Optional[int]
    max_pixels: Optional[int]
    predict: Callable[[torch.Tensor], np.ndarray]
    config_fingerprint: str


def checkpoint_scorer(path: str | Path) -> Scorer:
    model, cfg, classes = load_checkpoint(path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()

    @torch.inference_mode()
    def predict(x: torch.Tensor) -> np.ndarray:
        return torch.softmax(model(x.to(device)).float(), dim=1).cpu().numpy()

    return Scorer({"checkpoint": str(Path(path).resolve()), "runtime": f"pytorch ({device.type})"}, classes,
                  EvalSpec.from_data_config(cfg.data), cfg.serve.max_image_bytes, cfg.serve.max_image_pixels, predict,
                  config_fingerprint(cfg.to_dict()))


def onnx_scorer(path: str | Path, threads: int = 0) -> Scorer:
    """An ONNX file of an export folder (model.onnx or a quantized sibling); the folder's serving spec gives the rest."""
    path = Path(path)
    if not path.is_file():
        raise ServeError(f"ONNX file '{path}' does not exist; write it with 'seresnet serve export --checkpoint CKPT --out DIR'.")
    spec = read_export(path.parent)
    try:
        sess = ort_session(path, threads=threads)
    except ImportError as err:
        raise ServeError(f"ONNX Runtime is not installed here ({err}); install the 'export' extra.") from None
    except Exception as err:   # onnxruntime raises its own exception types for a file that is not a model
        raise ServeError(f"'{path}' does not load in ONNX Runtime ({type(err).__name__}: {err}); export it again.") from None
    name = sess.get_inputs()[0].name

    def predict(x: torch.Tensor) -> np.ndarray:
        return sess.run(None, {name: x.numpy().astype(np.float32)})[0]   # softmax is in the exported graph

    limits = spec["serve"]
    return Scorer({"onnx": str(path.resolve()), "runtime": "onnxruntime (cpu)"}, spec["classes"],
                  EvalSpec.from_dict(spec["eval"]), limits.get("max_image_bytes"), limits.get("max_image_pixels"),
                  predict, config_fingerprint({k: spec[k] for k in ("eval", "serve", "classes")}))


class _Images(Dataset):
    """(pixels, index, error) per file; an undecodable file yields zeros and its error so the batch goes on."""

    def __init__(self, files: list[Path], scorer: Scorer):
        self.files, self.s, self.tf = files, scorer, eval_transform(scorer.spec)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            img = decode_image(self.files[i].read_bytes(), self.s.max_bytes, self.s.max_pixels, self.s.spec)
            return self.tf(img), i, ""
        except (ImageDecodeError, OSError) as err:
            size = self.s.spec.image_size
            return torch.zeros(3, size, size), i, str(err) or type(err).__name__


def evaluate_offline(folder: str | Path, out_dir: str | Path, *, checkpoint: Optional[str | Path] = None,
                     onnx: Optional[str | Path] = None, batch_size: int = 64, workers: Optional[int] = None,
                     threads: int = 0, progress: bool = True) -> dict:
    if (checkpoint is None) == (onnx is None):
        raise ServeError("pass exactly one of --checkpoint FILE or --onnx FILE.")
    pairs = labelled_files(folder)
    scorer = checkpoint_scorer(checkpoint) if checkpoint is not None else onnx_scorer(onnx, threads)
    classes = scorer.classes
    unknown = sorted({c for _, c in pairs} - set(classes))
    if unknown:
        raise ServeError(f"folder classes {', '.join(unknown)} are not among the model's classes ({', '.join(classes)}); "
                         "name the class folders as the model's labels.")
    index = {c: i for i, c in enumerate(classes)}
    n_classes, k = len(classes), min(5, len(classes))
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    loader = DataLoader(_Images([p for p, _ in pairs], scorer), batch_size=batch_size, num_workers=workers)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    top5 = 0
    failures = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pairs), unit="img", desc=f"evaluate ({scorer.source['runtime']})")
    t0 = time.perf_counter()
    for pixels, idx, errors in loader:
        ok = [j for j, e in enumerate(errors) if not e]
        failures += [{"path": str(pairs[int(idx[j])][0]), "error": errors[j]} for j in range(len(errors)) if errors[j]]
        if ok:
            probs = scorer.predict(pixels[ok])
            truth = np.array([index[pairs[int(idx[j])][1]] for j in ok])
            np.add.at(confusion, (truth, probs.argmax(1)), 1)
            top5 += int((np.argsort(-probs, axis=1)[:, :k] == truth[:, None]).any(1).sum())
        if bar is not None:
            bar.update(len(errors))
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    scored = int(confusion.sum())
    if scored == 0:
        raise ServeError(f"none of the {len(pairs)} images under '{folder}' could be decoded (first: {failures[0]['error']}); "
                         "pass a folder of JPEG/PNG images.")
    top1 = round(float(np.trace(confusion)) / scored, 5)
    root = Path(folder)
    report = {
        **scorer.source, "folder": str(root.resolve()), "images": len(pairs), "scored": scored, "errors": len(failures),
        "top1": top1, "top5": round(top5 / scored, 5), "top5_k": k, "classes": classes,
        "per_class": per_class(confusion, classes), "confusion": confusion.tolist(), "failures": failures[:50],
        "wall_seconds": round(wall, 2), "images_per_second": round(len(pairs) / wall, 2) if wall > 0 else None,
        "test_top1": top1, "test_top5": round(top5 / scored, 5), "test_images": scored,
        "provenance": provenance(data_fingerprint=listing_fingerprint(
            (p.relative_to(root).as_posix(), c) for p, c in pairs)) | {"config_fingerprint": scorer.config_fingerprint},
    }
    write_report_files(out_dir, report, classes, confusion,
                       f"offline top-1 {100 * top1:.2f}% ({scored} images, {scorer.source['runtime']})")
    return report


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="seresnet evaluate", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a training checkpoint (e.g. runs/demo/train/checkpoints/best.pt)")
    src.add_argument("--onnx", help="an ONNX file inside an export folder (e.g. runs/demo/export/model.onnx)")
    p.add_argument("--data", required=True, help="labelled folder of <class>/<image> files (e.g. data/animals/test)")
    p.add_argument("--out", required=True, help="folder for report.json, confusion.json and confusion.png")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="image decoding processes (default: min(4, CPUs))")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: its default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(a: argparse.Namespace) -> int:
    return run_command(lambda: _evaluate_and_print(a))


def _evaluate_and_print(a: argparse.Namespace) -> int:
    r = evaluate_offline(a.data, a.out, checkpoint=a.checkpoint, onnx=a.onnx, batch_size=a.batch_size,
                         workers=a.workers, threads=a.threads, progress=not a.no_progress)
    print(f"[evaluate] {r['scored']} of {r['images']} images from {r['folder']} ({r['runtime']}): top-1 "
          f"{100 * r['top1']:.2f}%  top-{r['top5_k']} {100 * r['top5']:.2f}%  errors {r['errors']}")
    print(f"[evaluate] wrote {Path(a.out) / 'report.json'} and {Path(a.out) / 'confusion.png'}")
    return 0


def register(sub) -> None:
    """``seresnet evaluate``."""
    p = sub.add_parser("evaluate", help="score a labelled folder from a checkpoint or an ONNX file, no server needed",
                       description=__doc__.split("\n\n")[0])
    build_parser(p).set_defaults(run=lambda args, _rest: run(args))


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
