"""The one user-facing error type of ``serve``: the CLI prints its message as one sentence and exits 2."""


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
