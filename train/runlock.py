"""One run per output folder, and no orphaned workers: the ``<output_dir>/.lock`` file and the parent-death signal.

``arm_parent_death_signal`` makes a worker started by torchrun die when its launcher dies by any signal, SIGKILL
included. torchrun starts each worker in a session of its own (``start_new_session=True`` in
torch/distributed/elastic/multiprocessing/subprocess_handler/handler.py), so a ``kill -9`` of the launcher's
process group does not reach the workers: without this they keep training into the output folder and keep the
metrics ports.

``RunLock`` guards the output folder: rank 0 holds an exclusive ``flock`` on ``<output_dir>/.lock`` (which names
its pid, host and start time) for the whole run; a second run on the same folder is refused in one sentence naming
the holder. The kernel drops the ``flock`` when its holder dies, however it dies, so a lock left by a killed run is
recognised as stale and taken over with a log line. The other ranks only read the file: a lock held by a live
process of another run on this host makes them refuse too; whatever they cannot judge (another host) is rank 0's
decision, and torchrun stops the whole group when rank 0 exits.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Names a torchrun agent's command line carries (``launch local`` execs ``python -m torch.distributed.run``).
LAUNCHER_MARKERS = ("torch.distributed.run", "torchrun", "torch.distributed.launch", "torch/distributed/run.py")
# A holder that has exited can keep the flock for a moment through processes it forked (DataLoader workers, which
# stop within ~5 s of their parent); a new run waits this long for them before refusing.
DEAD_HOLDER_GRACE_S = 15.0


class RunLockError(RuntimeError):
    """The output folder is in use by another run, or this worker's launcher is already gone (one sentence)."""


# ----------------------------------------------------------------------------------------- parent-death signal


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def arm_parent_death_signal(sig: int = signal.SIGKILL) -> Optional[int]:
    """Under torchrun on Linux: have the kernel send ``sig`` to this process when its launcher exits; returns the
    launcher's pid (None when not armed: not under torchrun, or not Linux).

    SIGKILL, not SIGTERM: a worker whose launcher is gone cannot finish its job (its peers are being killed too) and
    checkpoints are written atomically, so nothing is gained by a handler that could delay the exit.
    The signal fires when the *thread* that forked us exits (prctl(2): "the parent in this case is considered to be
    the thread that created this process"); torchrun's agent starts and restarts workers from its main thread
    (LocalElasticAgent._start_workers via SimpleElasticAgent.run, subprocess.Popen in SubprocessHandler), so the
    signal fires exactly when the agent process dies.
    Race: if the launcher died before the signal was armed, this process has already been reparented (to pid 1 or a
    subreaper) and the kernel will never signal it; that is detected after arming and raised as RunLockError.
    """
    if not sys.platform.startswith("linux") or not under_torchrun():
        return None
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (%s); this worker will not stop by itself if torchrun is killed",
                    os.strerror(ctypes.get_errno()))
        return None
    cmd = _cmdline(parent)
    launcher_like = any(m in cmd for m in LAUNCHER_MARKERS)
    if os.getppid() != parent or (parent == 1 and not launcher_like):
        raise RunLockError(f"This worker's launcher (torchrun) exited before the worker started (it now belongs to pid "
                           f"{os.getppid()}); the worker stops rather than train unsupervised, so rerun the command.")
    if not launcher_like:
        log.warning("parent pid %d (%s) is not a torchrun agent; this worker stops when that process exits",
                    parent, cmd[:120] or "?")
    return parent


# ----------------------------------------------------------------------------------------- output-folder lock


def _proc_start_ticks(pid: int) -> Optional[int]:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/<pid>/stat), None when not running;
    zombies count as not running. Recorded with the pid so a recycled pid is not mistaken for the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def holder_alive(info: dict) -> Optional[bool]:
    """Whether the process a lock file names is running: True/False on this host, None for another host."""
    if info.get("host") != socket.gethostname():
        return None
    try:
        pid = int(info["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if not Path("/proc").is_dir():  # not Linux: existence only
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    ticks = _proc_start_ticks(pid)
    return ticks is not None and (info.get("pid_start") in (None, ticks))


def describe(info: dict) -> str:
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"


class RunLock:
    """``<output_dir>/.lock``: rank 0 takes it (``acquire``) before the run builds anything and frees it at the end
    (``release``); other ranks ``acquire`` too, which only checks. Usable as a context manager."""

    def __init__(self, output_dir: str | Path, rank: int = 0):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_NAME
        self.rank = rank
        self.run_id = os.environ.get("TORCHELASTIC_RUN_ID")
        self._fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- what the file says
    def _info(self) -> dict:
        pid = os.getpid()
        return {"pid": pid, "host": socket.gethostname(), "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "pid_start": _proc_start_ticks(pid), "run_id": self.run_id,
                "restart": os.environ.get("TORCHELASTIC_RESTART_COUNT"), "argv": sys.argv[:1] + sys.argv[1:8]}

    def read(self) -> Optional[dict]:
        """The lock file's contents, None when absent or unreadable (a writer caught mid-write is retried briefly)."""
        for _ in range(10):
            try:
                text = self.path.read_text()
            except OSError:
                return None
            try:
                info = json.loads(text)
                return info if isinstance(info, dict) else None
            except ValueError:
                time.sleep(0.05)
        return None

    def _refusal(self, info: Optional[dict]) -> RunLockError:
        holder = describe(info) if info else "a process whose details could not be read"
        return RunLockError(f"Output folder '{self.dir}' is in use by another training run ({holder}); wait for it to "
                            f"finish or stop it, or set another output_dir (a lock left by a crashed run on another "
                            f"host can be removed by deleting '{self.path}').")

    # -- acquire / release
    def acquire(self) -> None:
        if self.rank != 0:
            self._check_only()
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunLockError(f"Cannot create the output folder '{self.dir}' ({err.strerror}); set output_dir to a "
                               f"writable path.") from None
        deadline = time.monotonic() + DEAD_HOLDER_GRACE_S
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                info = self.read()
                if info is not None and holder_alive(info) is False and time.monotonic() < deadline:
                    time.sleep(0.5)  # the holder exited; processes it forked still hold the lock for a moment
                    continue
                raise self._refusal(info) from None
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                # A filesystem without flock: fall back to what the file says (pid liveness on this host).
                log.warning("the filesystem of '%s' does not support flock (%s); the run lock relies on the pid it "
                            "records", self.dir, err.strerror)
                info = self.read()
                if info and info.get("pid") != os.getpid() and holder_alive(info) is not False:
                    os.close(fd)
                    raise self._refusal(info) from None
            # A releasing holder unlinks the file while still locking it: make sure the path still names our inode.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            break
        previous = self.read()
        if previous and self.run_id is not None and previous.get("run_id") == self.run_id:
            log.info("run lock in %s taken over from this run's previous attempt (%s)", self.dir, describe(previous))
        elif previous:
            log.warning("recovered a stale lock in %s: the run that held it (%s) is gone", self.dir, describe(previous))
        data = json.dumps(self._info(), indent=1).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd = fd

    def _check_only(self) -> None:
        """Ranks other than 0: refuse when a live process of another run on this host holds the folder."""
        info = self.read()
        if not info or (self.run_id is not None and info.get("run_id") == self.run_id):
            return
        if holder_alive(info):
            raise self._refusal(info)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
