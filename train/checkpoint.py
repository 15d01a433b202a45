"""Checkpoints: atomic writes with a SHA-256 sidecar, keep-last-K, 'best', safe loading (weights_only), fallback on
corruption, and a finiteness check: a model state with NaN/inf is never written (a run resumed from it could not
recover)."""
from __future__ import annotations

import hashlib
import logging
import os
import re
import resource
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


def _fsync_dir(directory: Path) -> None:
    """Make renames and new names in ``directory`` durable: fsync of a file does not cover its directory entry
    (fsync(2): "a call to fsync() on a file descriptor for the directory is also needed")."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _digests(side: Path) -> list[str]:
    """The digests a sidecar lists (``sha256sum`` format, one ``<hex>  <name>`` line each); [] when missing."""
    try:
        return [line.split()[0] for line in side.read_text().splitlines() if line.strip()]
    except (FileNotFoundError, UnicodeDecodeError, IndexError):
        return []


def _write_sidecar(path: Path, digests: list[str]) -> None:
    _atomic_write_bytes(sidecar(path), "".join(f"{d}  {path.name}\n" for d in dict.fromkeys(digests)).encode())


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _install(tmp: Path, path: Path, digest: str) -> None:
    """Rename the complete, fsync'd ``tmp`` (SHA-256 ``digest``) onto ``path`` so that a crash at any point leaves
    ``path`` verifying against its sidecar: (1) the sidecar lists the digests of the file in place and the new one,
    (2) rename, (3) the sidecar lists the new one only. Each step is an atomic rename followed by a directory fsync.
    (Sidecar-then-rename alone leaves the old file beside the new checksum after a crash between the two.)"""
    old = _digests(sidecar(path)) if path.exists() else []
    _write_sidecar(path, old + [digest])
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old:
        _write_sidecar(path, [digest])


def _disk_error(what: Path, err: BaseException) -> "CheckpointError":
    free = shutil.disk_usage(what.parent).free / 2**20
    reason = getattr(err, "strerror", None)
    if not reason:   # torch's zip writer reports a short write as RuntimeError ('unexpected pos ...'), no errno
        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        reason = (f"the write stopped at the file size limit of {soft / 2**20:.0f} MiB (ulimit -f)"
                  if soft != resource.RLIM_INFINITY else f"the write stopped short: {str(err).splitlines()[0][:160]}")
    return CheckpointError(f"Could not write '{what}' ({reason}; {free:.0f} MiB free in '{what.parent}'); the previous "
                           f"checkpoint is kept and verifies. Free disk space (or lower train.keep_last) and rerun: the "
                           f"run resumes from the previous checkpoint.")


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temp file in the same folder, fsync, then install it with its checksum sidecar (``_install``).
    A write that fails (disk full, file too large) raises CheckpointError and leaves no temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        _install(Path(tmp), path, _sha256(Path(tmp)))
    except (OSError, RuntimeError) as err:   # torch's zip writer reports ENOSPC/EFBIG as RuntimeError
        Path(tmp).unlink(missing_ok=True)
        raise _disk_error(path, err) from None
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


def verify(path: str | Path) -> str:
    """Raise CheckpointError unless ``path``'s SHA-256 is one its sidecar lists; returns the digest."""
    path = Path(path)
    side = sidecar(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if not side.is_file():
        raise CheckpointError(f"checkpoint '{path}' has no checksum file '{side.name}' (copy it along with the "
                              f"checkpoint; for a file you trust: sha256sum {path.name} > {side.name})")
    digest = _sha256(path)
    if digest not in _digests(side):
        raise CheckpointError(f"checkpoint '{path}' is corrupt or truncated (SHA-256 does not match '{side.name}')")
    return digest


def loader_refusal(err: BaseException) -> str:
    """torch.load's refusal in a few words: its weights_only message spans many lines with advice to turn the
    protection off; the line that names what was refused (``Unsupported global: ...``) is what the user needs."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"(Unsupported global: GLOBAL [^ ]+|Unsupported operand [^ ]+|Weights only load failed)", text)
    return f"{type(err).__name__}: {found.group(1) if found else text.strip().splitlines()[0][:200]}"


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
        raise CheckpointError(f"checkpoint '{path}' was refused by the safe loader ({loader_refusal(err)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint '{path}' does not hold a dict")
    return obj


SUMS = "SHA256SUMS"


def seal_folder(folder: Path) -> None:
    """Checksum a checkpoint another library wrote as a folder of files (a DeepSpeed tag: model states and one ZeRO
    optimizer shard per rank): fsync every file, then write ``SHA256SUMS`` (``sha256sum -c`` format) atomically. A
    folder without it is a save that never finished."""
    lines = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != SUMS and not p.name.endswith(".tmp"):
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            lines.append(f"{_sha256(p)}  {p.relative_to(folder)}\n")
    _fsync_dir(folder)
    _atomic_write_bytes(folder / SUMS, "".join(lines).encode())


def verify_folder(folder: Path) -> None:
    side = folder / SUMS
    if not side.is_file():
        raise CheckpointError(f"checkpoint '{folder}' has no {SUMS} (its save did not finish)")
    for line in side.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        if not (folder / name).is_file() or _sha256(folder / name) != digest:
            raise CheckpointError(f"checkpoint '{folder}' is corrupt or truncated ('{name}' does not match {SUMS})")


def newest_sealed_folder(parent: Path, pattern: str = "step-*") -> Optional[str]:
    """Name of the newest ``parent/<pattern>`` folder that verifies (``seal_folder``); None when there is none at
    all; CheckpointError in one sentence when there are some and none verifies."""
    errors = []
    for folder in sorted((p for p in parent.glob(pattern) if p.is_dir()), reverse=True):
        try:
            verify_folder(folder)
            return folder.name
        except CheckpointError as err:
            errors.append(str(err))
            log.warning("%s; falling back to the previous checkpoint", err)
    if errors:
        raise CheckpointError(f"None of the {len(errors)} checkpoint(s) in '{parent}' can be resumed (newest: "
                              f"{errors[0]}); nothing was overwritten. Restore them from a backup, or start over with "
                              f"--set train.resume=false (they are moved aside, not deleted).")
    return None


def write_pointer(path: Path, text: str) -> None:
    """A small file such as DeepSpeed's ``latest``, replaced atomically and durably."""
    _atomic_write_bytes(path, text.encode())


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
        try:
            for name in ("last.pt",) + (("best.pt",) if is_best else ()):
                self._copy_atomic(path, self.dir / name)
        except OSError as err:
            raise _disk_error(self.dir / name, err) from None
        for old in self.step_files()[: -self.keep_last]:
            old.unlink(missing_ok=True)
            sidecar(old).unlink(missing_ok=True)
        return path

    @staticmethod
    def _copy_atomic(src: Path, dst: Path) -> None:
        """Point ``dst`` at ``src``'s bytes: a hard link (no copy of hundreds of MB), installed by ``_install``."""
        digest = _digests(sidecar(src))[-1]
        tmp = dst.with_name(f".{dst.name}.link.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:  # filesystems without hard links
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        try:
            _install(tmp, dst, digest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _tidy(self) -> None:
        """After a crash: remove temp files of unfinished writes and sidecars whose checkpoint never got its name."""
        stale = list(self.dir.glob(".*.tmp"))
        for tmp in stale:
            tmp.unlink(missing_ok=True)
        if stale:
            log.info("removed %d unfinished checkpoint write(s) left by an interrupted run", len(stale))
        for side in self.dir.glob("*.pt.sha256"):
            if not side.with_name(side.name[: -len(".sha256")]).exists():
                side.unlink(missing_ok=True)

    def set_aside(self) -> Optional[Path]:
        """Start over (train.resume=false) without mixing histories: an existing checkpoint folder is renamed to
        ``<folder>.replaced`` (one such copy is kept: an older one there is deleted), so no step file of the old run
        outlives into the new one and a mistaken start-over can still be undone."""
        if not self.dir.is_dir() or not any(self.dir.iterdir()):
            return None
        dst = self.dir.with_name(f"{self.dir.name}.replaced")
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(self.dir, dst)
        _fsync_dir(self.dir.parent)
        log.warning("train.resume=false: moved the existing checkpoints to '%s' (the run starts over; delete that "
                    "folder when no longer needed)", dst)
        return dst

    def load_latest(self) -> Optional[tuple[dict, Path]]:
        """Newest checkpoint that verifies: step files newest first, then last.pt (a copy where hard links are not
        available); corrupt ones are logged and skipped."""
        if not self.dir.is_dir():
            return None
        self._tidy()
        for name in ("last.pt", "best.pt"):   # a sidecar left listing two digests by a crash mid-update: settle it
            path = self.dir / name
            if len(_digests(sidecar(path))) > 1 and path.exists():
                try:
                    _write_sidecar(path, [verify(path)])
                except CheckpointError:
                    pass
        candidates = list(reversed(self.step_files())) + [self.last]
        errors = []
        for path in candidates:
            if not path.exists():
                continue
            try:
                return safe_load(path), path
            except CheckpointError as err:
                errors.append(str(err))
                log.warning("%s; falling back to the previous checkpoint", err)
        if errors:
            raise CheckpointError(f"None of the {len(errors)} checkpoint(s) in '{self.dir}' can be resumed (newest: "
                                  f"{errors[0]}); nothing was overwritten. Restore them from a backup, or start over "
                                  f"with --set train.resume=false (they are moved aside, not deleted).")
        return None

