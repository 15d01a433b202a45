"""`python -m serve evaluate`: score a labelled ImageFolder-style folder (`<class>/<image>`) through a running Triton server.

Top-1/top-5, per-class precision/recall, a confusion matrix (JSON + PNG, drawn by the trainer's own report code) and
client-side latency percentiles, from the same `classify` answers users get."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

from serve.client import FileResult, TritonClassifier, is_transient, retrying
from serve.contract import ENSEMBLE
from serve.errors import ServeError
from serve.images import find_images
from train.evaluate import per_class, plot_confusion


def labelled_files(folder: str | Path) -> list[tuple[Path, str]]:
    """(image, class name) for every image under ``folder/<class>/``, sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise ServeError(f"'{root}' is not a folder; pass an ImageFolder-style folder of <class>/<image> files.")
    pairs = [(p, d.name) for d in sorted(q for q in root.iterdir() if q.is_dir()) for p in find_images([d])]
    if not pairs:
        raise ServeError(f"'{root}' holds no <class>/<image> files; pass an ImageFolder-style folder (e.g. data/animals/test).")
    return pairs


def latency_summary(ms: list[float]) -> dict:
    a = np.asarray(ms, dtype=np.float64)
    if a.size == 0:
        return {}
    return {"p50": round(float(np.percentile(a, 50)), 2), "p95": round(float(np.percentile(a, 95)), 2),
            "p99": round(float(np.percentile(a, 99)), 2), "mean": round(float(a.mean()), 2), "max": round(float(a.max()), 2)}


def evaluate_folder(url: str, folder: str | Path, protocol: str = "grpc", out_dir: Optional[str | Path] = None, *,
                    model: str = ENSEMBLE, concurrency: int = 8, progress: bool = True, max_attempts: int = 6,
                    max_retry_seconds: float = 60.0, timeout_s: float = 60.0) -> dict:
    """Classify every ``folder/<class>/<image>`` through the server at ``url`` and return the report dict.

    Class names are matched to the served model's labels (a folder class the model does not know is an error).
    A failed request is an error, not a miss: top-1/top-5 are over the answered images, ``errors`` counts the rest. With ``out_dir``: report.json, confusion.json,
    confusion.png there."""
    pairs = labelled_files(folder)
    clf = TritonClassifier(url, protocol, model, timeout_s=timeout_s, max_attempts=max_attempts,
                           max_retry_seconds=max_retry_seconds)
    n_classes = clf.check(1)
    k = min(5, n_classes)
    # The model's label list, in index order: ask for every class once (the classification extension names them).
    probe = _labels(clf, [p for p, _ in pairs], n_classes)
    unknown = sorted({c for _, c in pairs} - set(probe))
    if unknown:
        raise ServeError(f"folder classes {', '.join(unknown)} are not among the model's classes ({', '.join(probe)}); "
                         "name the class folders as the model's labels.")
    index = {c: i for i, c in enumerate(probe)}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pairs), unit="img", desc=f"evaluate ({protocol} {clf.url})")

    def one(pair: tuple[Path, str]) -> FileResult:
        try:
            data = pair[0].read_bytes()
        except OSError as err:
            r = FileResult(str(pair[0]), error=f"cannot read file: {err}")
        else:
            r = clf.classify_bytes(data, k=k, name=str(pair[0]))
        if bar is not None:
            bar.update(1)
        return r

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        results = list(pool.map(one, pairs))
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()

    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    top5 = errors = 0
    failures = []
    for (path, cls), r in zip(pairs, results):
        if not r.ok:
            errors += 1
            failures.append({"path": str(path), "error": r.error})
            continue
        confusion[index[cls], index[r.top[0].label]] += 1
        top5 += any(p.label == cls for p in r.top)
    n = len(pairs)
    answered = n - errors   # a failed request (a crashed server or stub, a refused file) is an error, never a miss
    report = {
        "url": clf.url, "protocol": protocol, "model": model, "folder": str(Path(folder).resolve()),
        "images": n, "answered": answered, "errors": errors,
        "top1": round(float(np.trace(confusion)) / answered, 5) if answered else None,
        "top5": round(top5 / answered, 5) if answered else None,
        "top5_k": k, "classes": probe, "per_class": per_class(confusion, probe),
        "latency_ms": latency_summary([r.latency_ms for r in results if r.ok]),
        "wall_seconds": round(wall, 2), "images_per_second": round(n / wall, 2) if wall > 0 else None,
        "concurrency": concurrency, "confusion": confusion.tolist(), "failures": failures[:50],
    }
    if out_dir is not None:
        out = write_report_files(out_dir, report, probe, confusion,
                                 f"served top-1 {100 * (report['top1'] or 0):.2f}% ({answered} of {n} images answered, {protocol})")
        report["files"] = {"report": str(out / "report.json"), "confusion_png": str(out / "confusion.png")}
    return report


def write_report_files(out_dir: str | Path, report: dict, classes: list[str], confusion: np.ndarray, title: str) -> Path:
    """report.json, confusion.json and confusion.png of an evaluation into ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "confusion.json").write_text(json.dumps({"classes": classes, "matrix": confusion.tolist()}))
    plot_confusion(confusion, classes, out / "confusion.png", title)
    return out


def _labels(clf: TritonClassifier, images: list[Path], n_classes: int, tries: int = 20) -> list[str]:
    """The served label list in index order, from a top-all answer for the first image the server accepts."""
    from tritonclient.utils import InferenceServerException

    for image in images[:tries]:
        try:
            data = image.read_bytes()
        except OSError:
            continue
        try:
            for attempt in retrying(clf.max_attempts, clf.max_retry_seconds):
                with attempt:
                    top = clf.infer_array(np.frombuffer(data, dtype=np.uint8)[None, :], k=n_classes)[0]
        except (InferenceServerException, OSError) as err:
            if is_transient(err):   # retried and still failing: the server, not this image; do not wait out 19 more
                raise ServeError(f"the Triton server at {clf.url} did not answer ({(str(err).splitlines() or [type(err).__name__])[0]}); check the "
                                 "server, or raise --timeout.") from None
            continue
        labels = [""] * n_classes
        for p in top:
            labels[p.index] = p.label
        return labels
    raise ServeError(f"none of the first {min(tries, len(images))} images was classified, so the model's labels are unknown; "
                     "check the folder holds JPEG/PNG images.")


def format_report(r: dict) -> str:
    lat = r["latency_ms"]
    lines = [f"[evaluate] {r['images']} images from {r['folder']} via {r['protocol']} {r['url']} ({r['model']}): "
             + (f"top-1 {100 * r['top1']:.2f}%  top-{r['top5_k']} {100 * r['top5']:.2f}% over {r['answered']} answered"
              if r["answered"] else "no image was answered") + f"  errors {r['errors']}",
             f"[evaluate] latency ms p50 {lat.get('p50')}  p95 {lat.get('p95')}  p99 {lat.get('p99')}  "
             f"({r['images_per_second']} img/s at concurrency {r['concurrency']})",
             "[evaluate] per-class recall: " + "  ".join(f"{c} {v['recall']:.3f} ({v['support']})" for c, v in r["per_class"].items())]
    if "files" in r:
        lines.append(f"[evaluate] wrote {r['files']['report']} and {r['files']['confusion_png']}")
    return "\n".join(lines)
