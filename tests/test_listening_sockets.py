"""Nothing binds beyond loopback unless asked: every listening socket of a training run (`python -m train` with its
Prometheus endpoint on) is 127.0.0.1, and connections to it from the host's other addresses are refused. The same
check for the local tritonserver is tests/test_reliability_serve.py::test_every_listening_socket_of_the_local_server_is_loopback."""
from __future__ import annotations

import ipaddress
import socket
import subprocess
import time
import urllib.request

import psutil
import pytest

from tests.conftest import PY, ROOT, SMOKE_CONFIG, free_port, kill_tree, subprocess_env

pytestmark = pytest.mark.slow


def other_addresses() -> list[str]:
    """This host's IPv4 addresses other than loopback. None at all means the refusal cannot be checked: that fails
    (a host with only `lo` would otherwise pass by looping over nothing)."""
    found = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
             if a.family == socket.AF_INET and not a.address.startswith("127.")]
    assert found, "this host has no address besides loopback, so a connection from the network cannot be tried"
    return found


def listening_sockets(pid: int) -> list:
    root = psutil.Process(pid)
    found = []
    for p in [root] + root.children(recursive=True):
        try:
            found += [c for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            pass
    return found


def assert_loopback_only(listening: list, ports: set[int]) -> list[str]:
    """Every listening socket is 127.0.0.1 (or ::ffff:127.0.0.1), ``ports`` are among them, and each port refuses a
    connection to any other address of this host."""
    def ipv4(ip: str):
        a = ipaddress.ip_address(ip)
        return getattr(a, "ipv4_mapped", None) or a

    assert ports <= {c.laddr.port for c in listening}, (ports, listening)
    assert all(ipv4(c.laddr.ip) == ipaddress.ip_address("127.0.0.1") for c in listening), \
        [(c.laddr.ip, c.laddr.port) for c in listening]
    others = other_addresses()
    for addr in others:
        for port in ports:
            with socket.socket() as sock:
                sock.settimeout(2)
                assert sock.connect_ex((addr, port)) != 0, (addr, port)
    return others


def test_a_training_run_with_metrics_listens_on_loopback_only(tiny_imagefolder, tmp_path):
    port = free_port()
    cmd = [PY, "-m", "train", "--config", str(SMOKE_CONFIG), "--set", f"data.root={tiny_imagefolder}",
           "--set", f"output_dir={tmp_path / 'run'}", "--set", f"metrics.port={port}", "--set", "train.epochs=20"]
    log = tmp_path / "train.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    if b"seresnet_train_steps_total" in r.read():
                        break
            except OSError:
                time.sleep(0.5)
        assert proc.poll() is None, log.read_text()[-3000:]
        listening = listening_sockets(proc.pid)
        others = assert_loopback_only(listening, {port})
    finally:
        kill_tree(proc, group=True)
    print(f"\nRELIABILITY trainer sockets: {sorted((c.laddr.ip, c.laddr.port) for c in listening)}; refused from {others}")
