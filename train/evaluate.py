"""Evaluation: confusion matrix all-reduced over ranks, top-1/top-5, per-class precision/recall, report files."""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, labels: torch.Tensor, num_classes: int, device: torch.device,
             autocast=nullcontext, channels_last: bool = False,
             input_dtype: torch.dtype = torch.float32) -> dict:
    """Returns {"top1", "top5", "count", "confusion"} over the whole split (all ranks' shards summed)."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    top5 = torch.zeros(1, dtype=torch.int64, device=device)
    k = min(5, num_classes)
    for images, index in loader:
        images = images.to(device, dtype=input_dtype, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        target = labels[index.cpu()].to(device)
        with autocast():
            logits = model(images)
        logits = logits.float()
        pred = logits.argmax(1)
        confusion += torch.bincount(target * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)
        top5 += (logits.topk(k, 1).indices == target[:, None]).any(1).sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(confusion)
        dist.all_reduce(top5)
    model.train(was_training)
    count = int(confusion.sum())
    return {"top1": float(confusion.diag().sum()) / max(count, 1), "top5": float(top5) / max(count, 1),
            "count": count, "confusion": confusion.cpu().numpy()}


def per_class(confusion: np.ndarray, classes: list[str]) -> dict:
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(1)
    predicted = confusion.sum(0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    return {c: {"precision": round(float(p), 4), "recall": round(float(r), 4), "support": int(s)}
            for c, p, r, s in zip(classes, precision, recall, support)}


PLOT_MAX_CLASSES = 30   # beyond this the plot shows the most-confused classes only (a 1,000-class canvas is unreadable)


def most_confused(confusion: np.ndarray, n: int = PLOT_MAX_CLASSES) -> np.ndarray:
    """Indices (sorted) of the ``n`` classes with the most errors, counted as true class and as predicted class."""
    off = confusion - np.diag(np.diag(confusion))
    errors = off.sum(0) + off.sum(1)
    return np.sort(np.argsort(-errors, kind="stable")[:n])


def plot_confusion(confusion: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix; with more than PLOT_MAX_CLASSES classes, only the most-confused ones (their rows
    still normalised by the full row, so a cell reads as the share of that true class)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm_full = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    keep = np.arange(len(classes)) if len(classes) <= PLOT_MAX_CLASSES else most_confused(confusion)
    if len(keep) < len(classes):
        title = f"{title}\n{len(keep)} most-confused of {len(classes)} classes"
    sub = confusion[np.ix_(keep, keep)]
    norm = norm_full[np.ix_(keep, keep)]
    names = [classes[i] for i in keep]
    n = len(keep)
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * n + 2), max(4, 0.6 * n + 1.5)), dpi=120)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(n):
        for j in range(n):
            if sub[i, j]:
                ax.text(j, i, str(sub[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="row-normalised")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(out_dir: Path, classes: list[str], results: dict[str, dict], extra: Optional[dict] = None) -> dict:
    """report.json with test_top1, per-class metrics and confusion matrices; confusion_<split>.png/json beside it."""
    report: dict = {"classes": classes}
    for split, r in results.items():
        report[f"{split}_top1"] = round(r["top1"], 5)
        report[f"{split}_top5"] = round(r["top5"], 5)
        report[f"{split}_images"] = r["count"]
        report[f"{split}_per_class"] = per_class(r["confusion"], classes)
        report[f"{split}_confusion"] = r["confusion"].tolist()
        (out_dir / f"confusion_{split}.json").write_text(json.dumps({"classes": classes, "matrix": r["confusion"].tolist()}))
        plot_confusion(r["confusion"], classes, out_dir / f"confusion_{split}.png",
                       f"{split}: top-1 {100 * r['top1']:.2f}% ({r['count']} images)")
    if "test" in results:
        report["test_recall"] = {c: v["recall"] for c, v in report["test_per_class"].items()}
    report.update(extra or {})
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return report
