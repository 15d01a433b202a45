"""A server that accepts connections and never answers (the real tritonserver and its stubs SIGSTOPped): every client
call ends within its timeout (`--timeout`, TritonClassifier.timeout_s) times its attempts, as an error naming the
deadline, over gRPC and HTTP: per request, in the client's start-up check on a connection made before the server hung,
and in `serve classify` from a fresh process; once the server runs again
the same client is answered."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from launch.torchrun import REPO_ROOT
from tests.conftest import subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
TIMEOUT_S, ATTEMPTS = 2.0, 2


def _freeze(server, sig: int) -> None:
    os.killpg(server.proc.pid, sig)   # its own session: the server and its python stubs


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_hung_server_ends_every_call_within_the_clients_timeout(served, protocol, tmp_path):
    from serve.client import TritonClassifier
    from serve.errors import ServeError

    server = served["server"]
    url = server.grpc_url if protocol == "grpc" else server.http_url
    name, data = next(iter(served["images"].items()))
    image = tmp_path / name
    image.write_bytes(data)
    clf = TritonClassifier(url, protocol, timeout_s=TIMEOUT_S, max_attempts=ATTEMPTS, max_retry_seconds=30)
    clf.check(1)
    assert clf.classify_bytes(data, k=1, name=name).ok
    _freeze(server, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        hung = clf.classify_bytes(data, k=1, name=name)
        per_request = time.monotonic() - t0
        t0 = time.monotonic()
        with pytest.raises(ServeError, match=f"cannot reach a Triton server at {url}"):
            clf.check(1)   # on the connection made before the server hung
        check_s = time.monotonic() - t0
        t0 = time.monotonic()
        cli = subprocess.run([sys.executable, "-m", "serve", "classify", str(image), "--url", url, "--protocol", protocol,
                              "--timeout", str(TIMEOUT_S), "--max-attempts", str(ATTEMPTS), "--no-progress"],
                             cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
        cli_s = time.monotonic() - t0
    finally:
        _freeze(server, signal.SIGCONT)
    assert not hung.ok and hung.attempts == ATTEMPTS, hung
    assert ATTEMPTS * TIMEOUT_S <= per_request < ATTEMPTS * (TIMEOUT_S + 2) + 3, per_request   # + backoff with jitter
    assert check_s < ATTEMPTS * (TIMEOUT_S + 2) + 3, check_s
    assert ("Deadline Exceeded" if protocol == "grpc" else "timed out") in hung.error, hung.error
    assert cli.returncode == 2 and cli.stderr.count("\n") == 1, (cli.returncode, cli.stderr[-1500:])
    assert f"cannot reach a Triton server at {url}" in cli.stderr and f"{TIMEOUT_S:g} s per try" in cli.stderr, cli.stderr
    assert cli_s < 60, cli_s
    deadline = time.monotonic() + 60
    while not (after := clf.classify_bytes(data, k=1, name=name)).ok and time.monotonic() < deadline:
        time.sleep(1)
    assert after.ok, after.error
    print(f"\nRELIABILITY hung server ({protocol}): a request ended after {per_request:.1f} s ({hung.attempts} attempts: "
          f"{hung.error[:80]}), the check after {check_s:.1f} s, 'serve classify' exited 2 after {cli_s:.1f} s; answered again once resumed")
