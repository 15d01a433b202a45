"""The one user-facing error type of ``serve``: the CLI prints its message as one sentence and exits 2."""


class ServeError(RuntimeError):
    """A problem the user can fix (bad path, port in use, no GPU for a GPU-only option)."""
