"""Helpers shared by the python-backend models inside the Triton stub."""
from __future__ import annotations

import os


def read_labels(args: dict, cfg: dict) -> list[str]:
    """Class names from the label_filename of the model's first labelled output (the classification extension's file)."""
    for out in cfg.get("output", []):
        if out.get("label_filename"):
            with open(os.path.join(args["model_repository"], out["label_filename"])) as f:
                return [line.rstrip("\n") for line in f if line.strip()]
    return []
