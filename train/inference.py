"""A trained model from one of our checkpoints, ready for inference (export, offline evaluation, the GPU check)."""
from __future__ import annotations

from pathlib import Path

from train.checkpoint import FORMAT, CheckpointError, safe_load
from train.config import config_from_dict
from train.models import create_model


def load_for_inference(path: str | Path):
    """(model in eval mode, Config, classes) from one of our checkpoints, verified against its SHA-256 sidecar."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist; train first (seresnet train --config ...) or pass the right path")
    state = safe_load(path)   # no sidecar, or one that does not match: refused (an export must not ship a torn file)
    if state.get("format") != FORMAT or "model" not in state:
        raise CheckpointError(f"'{path}' is not a seresnet-stack checkpoint (no '{FORMAT}' format tag)")
    cfg = config_from_dict(state["config"])
    classes = list(state["classes"])
    model = create_model(cfg.model, len(classes), load_pretrained=False)
    model.load_state_dict(state["model"])
    model.eval()
    return model, cfg, classes
