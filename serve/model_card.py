"""MODEL_CARD.md of an export folder: what the model classifies, what it was trained and measured on, in which precision
it is served, what it is for and where it is not to be trusted. Written by `serve export` from the checkpoint and the
training run's report.json (found beside the checkpoints folder), so the card travels with the weights."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

MODEL_CARD = "MODEL_CARD.md"


def training_report(checkpoint: str | Path) -> Optional[dict]:
    """The run's report.json for ``<output_dir>/checkpoints/<file>.pt``, when it is there and readable."""
    path = Path(checkpoint).resolve().parent.parent / "report.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pct(x) -> str:
    return f"{100 * x:.2f}%" if isinstance(x, (int, float)) else "not measured"


def render_model_card(cfg, classes: list[str], export: dict, train: Optional[dict]) -> str:
    t = train or {}
    prov = t.get("provenance") or export.get("provenance") or {}
    git = prov.get("git") or {}
    recall = t.get("test_recall") or {}
    worst = sorted(recall.items(), key=lambda kv: kv[1])[:5]
    parity = export.get("parity", {})
    lines = [
        f"# Model card: {cfg.model.name} image classifier ({len(classes)} classes)",
        "",
        "## Model",
        f"- Architecture: {cfg.model.name}, input {cfg.data.image_size}x{cfg.data.image_size} RGB, softmax output "
        f"`{export.get('output', {}).get('name', 'probabilities')}` over {len(classes)} classes.",
        f"- Preprocessing (the training eval transform, also run by the server): resize shorter side to "
        f"{cfg.data.eval_resize}, centre crop {cfg.data.image_size}, normalise mean {list(cfg.data.mean)} std {list(cfg.data.std)}.",
        f"- Exported: ONNX opset {export.get('opset')}, fp32; parity with PyTorch max |diff| "
        f"{parity.get('max_abs_diff', float('nan')):.2e} on {parity.get('images', 0)} images. Served precision depends on "
        "the repository target: fp32 (cpu/onnx), int8 (static Q/DQ, checked for top-1 drift), fp16/int8 TensorRT plans built "
        "on the serving GPU.",
        f"- Code: commit {git.get('commit', 'unknown')}{' (uncommitted changes)' if git.get('dirty') else ''}; "
        f"config fingerprint {prov.get('config_fingerprint', 'unknown')}.",
        "",
        "## Classes",
        ", ".join(f"`{c}`" for c in classes[:200]) + (f", ... ({len(classes)} in all; see labels.txt)" if len(classes) > 200 else ""),
        "",
        "## Data",
        f"- Trained on the ImageFolder at `{cfg.data.root}` (train/ val/ test/ splits); listing fingerprint "
        f"{prov.get('data_fingerprint', 'unknown')}.",
        (f"- Training: {t.get('epochs')} epochs, {t.get('steps')} steps, {t.get('precision')} on "
         f"{t.get('device')} x {t.get('world_size')} ({t.get('engine')})." if train else "- Training: no report found."),
        "",
        "## Metrics (held-out splits, measured by the trainer)",
        f"- Test top-1 {_pct(t.get('test_top1'))}, top-5 {_pct(t.get('test_top5'))} on {t.get('test_images', '?')} images; "
        f"validation top-1 {_pct(t.get('val_top1'))}.",
    ]
    if worst:
        lines.append("- Lowest per-class test recall: " + ", ".join(f"`{c}` {100 * r:.1f}%" for c, r in worst) + ".")
    if not train:
        lines.append("- No training report was found beside the checkpoint: score the model with `seresnet evaluate`.")
    lines += [
        "",
        "## Intended use",
        f"- Classifying images into the {len(classes)} classes above, for images like those of the training data "
        "(same kind of camera, framing and subject), behind the Triton `classify` ensemble or offline.",
        "",
        "## Limits",
        "- Every input is assigned one of the known classes: there is no \"none of these\" answer; an image of something "
        "else still gets a confident-looking label. Watch the served confidence histogram for drift.",
        "- Accuracy is measured on a split of the same collection as the training data; expect lower accuracy on images "
        "from other sources, and check per-class recall before relying on rare classes.",
        "- Not evaluated for fairness, safety-critical or adversarial settings.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(out_dir: str | Path, cfg, classes: list[str], export: dict, checkpoint: str | Path) -> Path:
    path = Path(out_dir) / MODEL_CARD
    path.write_text(render_model_card(cfg, classes, export, training_report(checkpoint)))
    return path
