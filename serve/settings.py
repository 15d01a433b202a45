"""Serving settings at repository time: the export's ``serve`` block (batching, instances, limits, frozen in the
checkpoint at training time) with ``serve.KEY=VALUE`` overrides, validated by the training config's own schema."""
from __future__ import annotations

from typing import Sequence

from serve.errors import ServeError
from train.config import ConfigError, ServeConfig, config_from_dict, parse_override

SERVE_KEYS = tuple(ServeConfig.model_fields)


def serve_settings(spec_serve: dict, overrides: Sequence[str] = ()) -> dict:
    """The export's serving settings with ``serve.KEY=VALUE`` overrides, validated as the training config is."""
    tree = {k: v for k, v in spec_serve.items() if k in SERVE_KEYS}
    for item in overrides:
        try:
            key, value = parse_override(item)
        except ConfigError as err:
            raise ServeError(str(err)) from None
        section, _, name = key.partition(".")
        if section != "serve" or not name or "." in name:
            raise ServeError(f"--set {item}: only serving settings can be set at repository time; use serve.KEY=VALUE "
                             f"with KEY one of {', '.join(SERVE_KEYS)}.")
        tree[name] = value
    try:
        return config_from_dict({"serve": tree}).serve.model_dump()
    except ConfigError as err:
        raise ServeError(str(err)) from None
