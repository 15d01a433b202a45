"""One writer, or any number of servers, per model repository folder.

``serve repository`` holds an exclusive ``flock`` on the repository folder itself while it writes; a local
tritonserver (serve/server.py) holds a shared one for as long as it runs, handed to the server process so that the
lock lives as long as the server does even when its launcher is killed. So a second writer, a writer against a running
server, and a server against a writer in progress are each refused in one sentence, and the kernel drops a lock when
its holder dies, however it dies. The lock is on the folder (no lock file: a read-only repository can be served and
nothing is added to it). A filesystem without ``flock`` (some network filesystems) is written and served unlocked,
with a warning."""
from __future__ import annotations

import errno
import fcntl
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from serve.errors import ServeError

log = logging.getLogger(__name__)
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF)


def holders(folder: Path) -> list[str]:
    """Who holds a ``flock`` on ``folder``, from /proc/locks ("pid N: command"); empty where that cannot be read."""
    try:
        st = os.stat(folder)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    found = []
    for line in lines:
        parts = line.split()
        if "FLOCK" in parts and inode in parts and "->" not in parts:
            pid = parts[parts.index(inode) - 1]
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                cmd = " ".join([Path(argv[0].decode(errors="replace")).name]
                               + [a.decode(errors="replace") for a in argv[1:4] if a])
            except OSError:
                cmd = "exited; a process it started still holds the lock"
            found.append(f"pid {pid}: {' '.join(cmd.split())[:120]}")
    return found


def _who(folder: Path) -> str:
    return "; ".join(holders(folder)) or "a process on this host"


def acquire(folder: str | Path, mode: str) -> Optional[int]:
    """Lock ``folder`` (an existing directory) for ``mode`` 'write' (exclusive) or 'serve' (shared) and return the
    descriptor that holds the lock (``release`` it), or None where the filesystem has no ``flock``."""
    folder = Path(folder)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if mode == "write" else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        served = False
        if mode == "write":   # held shared (servers only) or exclusive (another writer)?
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                served = True
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # the other writer may have finished in between
                return fd
            except BlockingIOError:
                pass
        os.close(fd)
        who = _who(folder)
        if mode != "write":
            raise ServeError(f"model repository '{folder}' is being written by 'serve repository' ({who}); start the "
                             "server when it has finished.") from None
        if served:
            raise ServeError(f"'{folder}' is served by a running tritonserver ({who}); a repository is not rewritten "
                             "under its server: stop the server first, or write to a new --out folder and serve that.") from None
        raise ServeError(f"'{folder}' is being written by another 'serve repository' ({who}); wait for it to finish, "
                         "or write to another --out folder.") from None
    except OSError as err:
        os.close(fd)
        if err.errno not in UNSUPPORTED:
            raise
        log.warning("the filesystem of '%s' has no flock (%s): it is %s without a lock", folder, err.strerror,
                    "written" if mode == "write" else "served")
        return None


def release(fd: Optional[int]) -> None:
    if fd is not None:
        os.close(fd)


@contextmanager
def writing(out_dir: str | Path) -> Iterator[Path]:
    """The resolved ``out_dir``, created if needed and locked for writing until the block ends; a folder this call
    created is removed again when the block fails before writing anything into it."""
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise ServeError(f"--out '{out_dir}' is a file; pass a new or empty folder for the repository.")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ServeError(f"cannot create --out '{out_dir}' ({err.strerror}); pass a folder you can write.") from None
    fd = acquire(out, "write")
    try:
        yield out
    except BaseException:
        if created:
            try:
                out.rmdir()   # only when still empty
            except OSError:
                pass
        raise
    finally:
        release(fd)
