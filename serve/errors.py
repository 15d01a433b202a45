"""The one user-facing error type of ``serve``: the CLI prints its message as one sentence and exits 2."""
from __future__ import annotations

import sys
from typing import Callable


class ServeError(RuntimeError):
    """A problem the user can fix (bad path, port in use, no GPU for a GPU-only option)."""


# An optional dependency missing from this install -> the extra of pyproject.toml that brings it.
EXTRA_OF = {"onnx": "export", "onnxruntime": "export", "tritonclient": "triton-local", "google": "triton-local",
            "tenacity": "triton-local", "tensorrt": "tensorrt", "polygraphy": "tensorrt", "nvidia": "dali"}


def missing_extra(err: ModuleNotFoundError) -> str:
    """One sentence for a missing optional dependency, naming the extra to install."""
    top = (err.name or "").split(".")[0]
    extra = EXTRA_OF.get(top)
    if extra is None:
        return ""
    return (f"this command needs '{err.name}', which this install lacks; install the '{extra}' extra: "
            f"pip install 'seresnet-stack[{extra}]' (from a checkout: pip install -c constraints.txt '.[{extra}]').")


def run_command(call: Callable[[], int]) -> int:
    """Run a CLI command: a ServeError or a missing optional dependency ends in one sentence and exit 2."""
    try:
        return call()
    except ServeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if not missing_extra(err):
            raise
        print(f"error: {missing_extra(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
