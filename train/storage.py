"""Whether this process may write its output folder, said in one sentence. On NFS, Kubernetes' ``fsGroup`` does not
change the ownership or mode of the export (the kubelet skips the recursive chown for NFS volumes), so a pod running
as uid 1000 meets a folder owned by another uid: the first checkpoint would die in a traceback hours into a run."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Optional

# errno values that mean "this process may not write there" (not a full disk or a lost server)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class StorageError(RuntimeError):
    """The output folder cannot be written by this process, in one sentence."""


def unwritable(folder: str | Path, err: OSError) -> str:
    uid, gid = os.getuid(), os.getgid()
    return (f"Cannot write to '{folder}' ({err.strerror}) as uid {uid} (gid {gid}): run the job as the uid that owns "
            f"the folder (securityContext.runAsUser; on NFS fsGroup does not change ownership), or make it writable "
            f"for uid {uid} on the server (chown/chmod), or set output_dir to a writable path.")


def check_writable(*folders: str | Path) -> None:
    """Create each folder (and its parents) and a temp file in it, as this process: StorageError when that is refused."""
    for folder in folders:
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".write-check.", suffix=".tmp")
            os.close(fd)
            os.unlink(tmp)
        except OSError as err:
            if err.errno not in NOT_WRITABLE:
                raise
            raise StorageError(unwritable(_nearest_existing(folder), err)) from None


def sentence_for(err: OSError) -> Optional[str]:
    """The one sentence for a write refused during a run (a checkpoint folder made read-only later), else None."""
    if err.errno not in NOT_WRITABLE or not err.filename:
        return None
    return unwritable(_nearest_existing(Path(err.filename).parent), err)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
