"""Run the real tritonserver binary (from the nvidia-pytriton wheel) on 127.0.0.1: private python backend dir, readiness with a timeout, stub-failure detection, SIGTERM forwarding."""
from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Optional, Sequence

from serve.errors import ServeError
from serve.repository_lock import acquire as lock_repository, release as unlock_repository

HOST = "127.0.0.1"
STUB_PYTHON = "3.11"
# Log lines that mean a python model can never become ready (a dead stub otherwise leaves the server waiting).
FATAL_PATTERNS = re.compile(
    r"(Stub process .* (is not healthy|failed)|Failed to (start|initialize) (the )?stub|failed to load '[^']+'|"
    r"Failed to load model|error: creating server|failed to start|Address already in use|"
    r"ModuleNotFoundError|ImportError|Failed to open the cudaIpcHandle|Unexpected EOF)", re.IGNORECASE)


def triton_home() -> Path:
    """Where scripts/setup_env.sh unpacked the wheel: $SERESNET_TRITON_HOME or <venv>/tools/triton."""
    return Path(os.environ.get("SERESNET_TRITON_HOME", Path(sys.prefix) / "tools" / "triton"))


def tritonserver_binary() -> Path:
    return triton_home() / "tritonserver" / "bin" / "tritonserver"


def triton_libs() -> Path:
    return triton_home() / "libs"


_HANDED_OUT: "collections.deque[int]" = collections.deque(maxlen=256)


def free_port() -> int:
    """A free port on HOST that this process has not handed out recently: the OS may return a just-closed port
    again, and two of one server's ports equal make tritonserver exit ("cannot listen to GRPC requests and metrics
    requests at the same address and port")."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.append(port)
            return port


def check_port_free(port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As tritonserver binds (SO_REUSEADDR): a port left in TIME_WAIT by a just-stopped server is free, a listening one is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            raise ServeError(f"{what} port {port} on {HOST} is in use; pick another with --{what}-port or pass 0 for a free one.") from None


def check_repository(repository: str | Path) -> Path:
    repo = Path(repository)
    if not repo.is_dir():
        raise ServeError(f"model repository '{repo}' does not exist; write one with 'python -m serve repository --checkpoint CKPT --out {repo}'.")
    models = [d for d in repo.iterdir() if d.is_dir() and (d / "config.pbtxt").is_file()]
    if not models:
        raise ServeError(f"'{repo}' holds no models (no <model>/config.pbtxt); write one with 'python -m serve repository'.")
    return repo


def make_backend_dir(root: Path) -> Path:
    """A private backends/python with the library, the utils module and the 3.11 stub (the wheel's layout keeps stubs apart)."""
    src = triton_home() / "tritonserver"
    dst = root / "backends" / "python"
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(src / "backends" / "python" / f, dst / f)
    shutil.copy2(src / "python_backend_stubs" / STUB_PYTHON / "triton_python_backend_stub", dst / "triton_python_backend_stub")
    return root / "backends"


def server_env(stub_python_bin: Optional[str | Path] = None) -> dict:
    """The server's environment. The python stub embeds an interpreter that looks up `python3` on PATH and takes the
    prefix (and a venv's site-packages, via pyvenv.cfg) from it: the first `bin` on PATH is the stub's environment.
    Default: this venv (torch, onnxruntime, numpy<2); ``stub_python_bin`` puts another environment's bin first."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(stub_python_bin or Path(sys.prefix) / 'bin')}{os.pathsep}{env.get('PATH', '')}"
    if stub_python_bin:
        env.pop("PYTHONPATH", None)  # nothing of the caller's path leaks into the other environment
    env["LD_LIBRARY_PATH"] = f"{triton_libs()}{os.pathsep}{env.get('LD_LIBRARY_PATH', '')}".rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class TritonServer:
    """A tritonserver process bound to 127.0.0.1; ports 0 pick free ones. Use as a context manager.

    >>> with TritonServer("runs/model_repository") as server:
    ...     print(server.grpc_url, server.http_url, server.metrics_url)
    """

    def __init__(self, repository: str | Path, http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
                 ready_timeout: float = 180.0, log_path: Optional[str | Path] = None, log_verbose: int = 0,
                 extra_args: Sequence[str] = (), echo: bool = False, stub_python_bin: Optional[str | Path] = None,
                 cwd: Optional[str | Path] = None):
        self.repository = check_repository(repository).resolve()
        given = [p for p in (http_port, grpc_port, metrics_port) if p]
        if len(set(given)) < len(given):
            raise ServeError(f"the http, grpc and metrics ports must differ (got {http_port}, {grpc_port}, {metrics_port}).")
        for port, what in ((http_port, "http"), (grpc_port, "grpc"), (metrics_port, "metrics")):
            if port:
                check_port_free(port, what)
        _HANDED_OUT.extend(given)
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.ready_timeout = ready_timeout
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args)
        self.echo = echo
        self.stub_python_bin, self.cwd = stub_python_bin, cwd
        self._tmp = tempfile.TemporaryDirectory(prefix="seresnet-triton-")
        self.log_path = Path(log_path) if log_path else Path(self._tmp.name) / "tritonserver.log"
        self.proc: Optional[subprocess.Popen] = None
        self._fatal: Optional[str] = None
        self._reader: Optional[threading.Thread] = None
        self._lock_fd: Optional[int] = None
        self._group_killed = False

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        binary = tritonserver_binary()
        backends = Path(self._tmp.name) / "backends"
        return [
            str(binary), f"--model-repository={self.repository}", f"--backend-directory={backends}",
            f"--http-address={HOST}", f"--http-port={self.http_port}",
            f"--grpc-address={HOST}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={HOST}", f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=true",
            "--strict-readiness=true", "--exit-on-error=true", "--exit-timeout-secs=10", f"--log-verbose={self.log_verbose}",
            # Unique shared-memory names: several servers (tests, benchmarks) may run on one host.
            f"--backend-config=python,shm-region-prefix-name=seresnet_{os.getpid()}_{uuid.uuid4().hex[:8]}_",
            "--backend-config=python,stub-timeout-seconds=60",
            *self.extra_args,
        ]

    def start(self) -> "TritonServer":
        if self.proc is not None and self.proc.poll() is None:
            raise ServeError("this TritonServer is already running; use either start() or 'with TritonServer(...)', not both.")
        binary = tritonserver_binary()
        if not binary.is_file():
            raise ServeError(f"tritonserver not found at '{binary}'; run scripts/setup_env.sh (make venv) to unpack it.")
        # Shared with other servers, refused while 'serve repository' writes it; the server process inherits the
        # descriptor, so the repository stays locked while it runs even if this process is killed.
        self._lock_fd = lock_repository(self.repository, "serve")
        try:
            make_backend_dir(Path(self._tmp.name))
            self._log = open(self.log_path, "w")
            self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         env=server_env(self.stub_python_bin), cwd=self.cwd, text=True, errors="replace",
                                         start_new_session=True, pass_fds=() if self._lock_fd is None else (self._lock_fd,))
        except BaseException:
            unlock_repository(self._lock_fd)
            self._lock_fd = None
            raise
        self._group_killed = False
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        self.wait_ready()
        return self

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.write(line)
            self._log.flush()
            if self.echo:
                sys.stderr.write(line)
            if self._fatal is None and FATAL_PATTERNS.search(line):
                self._fatal = line.strip()

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail(f"tritonserver exited with code {self.proc.returncode} before it was ready")
            if self._fatal:
                self._fail(f"tritonserver could not load a model ({self._fatal[:300]})")
            if self.is_ready():
                return
            time.sleep(0.25)
        self._fail(f"tritonserver was not ready after {self.ready_timeout:.0f} s (a python stub may have hung)")

    def stubs(self) -> dict[int, str]:
        """The server's python stubs: {pid: 'model'} (from /proc; the stub's first argument is <model>/<version>/model.py)."""
        found = {}
        if self.proc is None:
            return found
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError):
                continue
            if int(fields[1]) == self.proc.pid and argv[0].endswith(b"triton_python_backend_stub"):
                model = Path(argv[1].decode(errors="replace")).parent.parent.name if len(argv) > 1 else "?"
                found[int(stat.parent.name)] = f"'{model}'"
        return found

    def dead_stub(self, watched: dict[int, str]) -> Optional[str]:
        """'model' (pid N) of a stub in ``watched`` that has exited (gone or a zombie), None while all run."""
        for pid, name in watched.items():
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                state = "gone"
            if state in ("gone", "Z", "X"):
                return f"{name} (pid {pid})"
        return None

    def _fail(self, why: str) -> None:
        self.stop()
        raise ServeError(f"{why}; see the log at {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the server and its stubs
                self.proc.wait()
        # Stubs of a server that died (killed, crashed) run on for a while, one once for over 150 s: their own exit
        # after the parent's death is slow and its cause was not established. They are in the server's process group,
        # which outlives its leader while they live; killed once, while this object's process is the group's.
        if not self._group_killed:
            self._group_killed = True
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._reader is not None:
            self._reader.join(5)
        unlock_repository(self._lock_fd)
        self._lock_fd = None
        rc = self.proc.returncode
        return rc

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if not self.log_path.is_relative_to(Path(self._tmp.name)):
            self._tmp.cleanup()


def run_foreground(repository: str | Path, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                   ready_timeout: float = 180.0) -> int:
    """`python -m serve up`: start, report readiness, forward SIGTERM/SIGINT, return the server's exit code."""
    server = TritonServer(repository, http_port, grpc_port, metrics_port, ready_timeout=ready_timeout, echo=True)
    stop = threading.Event()

    def forward(signum, _frame):
        stop.set()
        if server.proc is not None and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    server.start()
    stubs = server.stubs()
    print(f"[serve] ready: http {server.http_url}  grpc {server.grpc_url}  metrics {server.metrics_url}  "
          f"(repository {server.repository}; {len(stubs)} python stubs; SIGTERM or Ctrl-C stops it)", flush=True)
    while server.proc.poll() is None:
        dead = None if stop.is_set() else server.dead_stub(stubs)
        if dead:
            # Triton does not restart a python stub that died, and every request to its model fails from then on
            # while /v2/health/ready (2.51) stays 200: stop, so that whatever restarts this command restarts the server.
            print(f"[serve] error: the python stub of {dead} died and Triton does not restart it; the server was stopped "
                  "so that it can be started again (a supervisor that restarts 'serve up' on a non-zero exit does it).",
                  file=sys.stderr, flush=True)
            server.stop()
            return 3
        time.sleep(0.5)
    server.stop()
    return 0 if stop.is_set() else (server.proc.returncode or 0)
