"""Checkpoints: atomic writes with a SHA-256 sidecar, keep-last-K, 'best', safe loading (weights_only), fallback on
corruption, and a finiteness check: a model state with NaN/inf is never written (a run resumed from it could not
recover)."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)

FORMAT = "seresnet-stack/1"


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temp file in the same folder, fsync, write the checksum sidecar, then rename into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        digest = _sha256(Path(tmp))
        # Sidecar first: a crash between the two renames leaves a checksum that does not match the old file,
        # which is detected and falls back; never a corrupt file that verifies.
        _atomic_write_bytes(path.with_name(path.name + ".sha256"), f"{digest}  {path.name}\n".encode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def nonfinite_tensors(tensors: dict) -> list[str]:
    """Names of floating-point tensors in ``tensors`` (a state dict) holding NaN or inf."""
    return [k for k, v in tensors.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_finite(model_state: dict, step: Optional[int] = None) -> None:
    """Raise CheckpointError when a model state dict holds NaN/inf (weights or buffers such as BatchNorm statistics)."""
    bad = nonfinite_tensors(model_state)
    if bad:
        at = f" at step {step}" if step is not None else ""
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(f"Refused to write a checkpoint{at}: the model holds NaN/inf in {', '.join(bad[:3])}{more}; "
                              f"the previous checkpoint is kept (lower optim.lr to avoid the divergence).")


def verify(path: str | Path) -> None:
    path = Path(path)
    side = path.with_name(path.name + ".sha256")
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if not side.is_file():
        raise CheckpointError(f"checkpoint '{path}' has no checksum file '{side.name}'")
    expected = side.read_text().split()[0]
    if _sha256(path) != expected:
        raise CheckpointError(f"checkpoint '{path}' is corrupt or truncated (SHA-256 does not match '{side.name}')")


def safe_load(path: str | Path, check: bool = True) -> dict:
    """Load a checkpoint with weights_only=True (a pickle that wants code is refused), verifying its checksum."""
    path = Path(path)
    if check:
        verify(path)
    elif not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"checkpoint '{path}' was refused by the safe loader ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint '{path}' does not hold a dict")
    return obj


class CheckpointManager:
    """<dir>/step-XXXXXXXX.pt (keep last K), last.pt -> newest, best.pt by validation top-1."""

    def __init__(self, directory: str | Path, keep_last: int = 3):
        self.dir = Path(directory)
        self.keep_last = keep_last

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.dir / "best.pt"

    def step_files(self) -> list[Path]:
        return sorted(self.dir.glob("step-*.pt"))

    def save(self, state: dict, step: int, is_best: bool = False) -> Path:
        """Write step-<step>.pt and point last.pt (and best.pt) at it; refuses a non-finite ``state['model']``."""
        for key in ("model", "train_model"):  # train_model: the raw weights when ``model`` holds an average (EMA)
            check_finite(state.get(key) or {}, step)
        state = {"format": FORMAT, **state}
        path = atomic_save(state, self.dir / f"step-{step:08d}.pt")
        for name in ("last.pt",) + (("best.pt",) if is_best else ()):
            self._copy_atomic(path, self.dir / name)
        for old in self.step_files()[: -self.keep_last]:
            old.unlink(missing_ok=True)
            old.with_name(old.name + ".sha256").unlink(missing_ok=True)
        return path

    def mark_best(self, src: Path) -> None:
        self._copy_atomic(src, self.best)

    @staticmethod
    def _copy_atomic(src: Path, dst: Path) -> None:
        """Point ``dst`` at ``src``'s bytes: a hard link (no copy of hundreds of MB), replaced atomically."""
        digest = src.with_name(src.name + ".sha256").read_text().split()[0]
        tmp = dst.with_name(f".{dst.name}.link.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:  # filesystems without hard links
            shutil.copyfile(src, tmp)
        _atomic_write_bytes(dst.with_name(dst.name + ".sha256"), f"{digest}  {dst.name}\n".encode())
        os.replace(tmp, dst)

    def load_latest(self) -> Optional[tuple[dict, Path]]:
        """Newest checkpoint that verifies: last.pt, else step files newest first; corrupt ones are logged and skipped."""
        # Temp files of writes a kill interrupted (never renamed into place): nobody reads them; free the disk.
        stale = list(self.dir.glob(".*.tmp"))
        for tmp in stale:
            tmp.unlink(missing_ok=True)
        if stale:
            log.info("removed %d unfinished checkpoint write(s) left by an interrupted run", len(stale))
        candidates = [self.last] + list(reversed(self.step_files()))
        for path in candidates:
            if not path.exists():
                continue
            try:
                return safe_load(path), path
            except CheckpointError as err:
                log.warning("%s; falling back to the previous checkpoint", err)
        return None


def load_for_inference(path: str | Path):
    """(model in eval mode, Config, classes) from one of our checkpoints; used by serve.export."""
    from train.config import config_from_dict
    from train.models import create_model

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist; train first (python -m train --config ...) or pass the right path")
    side = path.with_name(path.name + ".sha256")
    state = safe_load(path, check=side.exists())
    if state.get("format") != FORMAT or "model" not in state:
        raise CheckpointError(f"'{path}' is not a seresnet-stack checkpoint (no '{FORMAT}' format tag)")
    cfg = config_from_dict(state["config"])
    classes = list(state["classes"])
    model = create_model(cfg.model, len(classes), load_pretrained=False)
    model.load_state_dict(state["model"])
    model.eval()
    return model, cfg, classes
