"""Reliability and security of serving against one real tritonserver (127.0.0.1, free ports): 1,000 mixed good/bad
requests at concurrency 16 over gRPC and HTTP with readiness polled throughout, the server restarted under client
load with nothing lost, and every listening socket bound to loopback. docs/reliability.md has the results table."""
from __future__ import annotations

import ipaddress
import random
import socket
import struct
import threading
import time
import urllib.request
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serve.client import SHED_MESSAGES
from tests.serve_fixtures import big_png, gif_bytes, make_checkpoint, reference_probabilities

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]
TOTAL, CONCURRENCY = 1000, 16
CLIENT_ERROR = ("400", "StatusCode.INVALID_ARGUMENT")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The production defaults of the limits (20 MB, 40 Mpx): the bombs below are refused by the real guard."""
    from serve.repository import write_model_repository
    from serve.images import sample_image_bytes
    from serve.server import TritonServer

    d = tmp_path_factory.mktemp("triton-rel")
    ckpt = make_checkpoint(d / "ckpt")
    repo = write_model_repository(ckpt, d / "repo", "cpu")
    images = sample_image_bytes()
    ref, classes = reference_probabilities(ckpt, list(images.values()))
    state = {"ckpt": ckpt, "repo": repo, "images": images, "ref": dict(zip(images, ref)), "classes": classes}
    state["server"] = TritonServer(repo, ready_timeout=240).start()
    try:
        yield state
    finally:
        state["server"].stop()


def png_header_bomb(width: int, height: int) -> bytes:
    """A 100-byte PNG claiming width x height pixels (a decoder that trusts it would allocate width*height*3 bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def bad_payloads(images: dict[str, bytes]) -> dict[str, tuple[np.ndarray, str, str]]:
    """kind -> (input array, Triton dtype, words the refusal must contain)."""
    u8 = lambda b: np.frombuffer(b, np.uint8)[None]  # noqa: E731
    jpeg = images["chelsea.jpg"]
    return {
        "non-image bytes": (u8(b"GET / HTTP/1.1\r\n" * 40), "UINT8", "preprocess accepts JPEG and PNG only"),
        "truncated jpeg": (u8(jpeg[: len(jpeg) // 2]), "UINT8", "not a decodable image"),
        "png bomb 7000x6000 (real, 42 Mpx)": (u8(big_png(7000, 6000)), "UINT8", "over the limit of 40000000"),
        # 2.5 Gpx: over Pillow's own guard too, but ours refuses first (Pillow's is disabled in preprocess, ours runs
        # on the header before any pixel is decoded).
        "png header bomb 50000x50000": (u8(png_header_bomb(50000, 50000)), "UINT8", "50000x50000 = 2500000000 pixels, over the limit of 40000000"),
        "gif (decodable, not accepted)": (u8(gif_bytes()), "UINT8", "preprocess accepts JPEG and PNG only"),
        "empty body": (np.zeros((1, 0), np.uint8), "UINT8", "expected a batch of encoded images"),
        "wrong dtype (FP32)": (np.frombuffer(jpeg[:4000], np.uint8).astype(np.float32)[None], "FP32", "data-type"),
        "oversize body (21 MB)": (np.zeros((1, 21_000_000), np.uint8), "UINT8", "over the limit of 20000000"),
    }


class ReadinessPoller(threading.Thread):
    """Polls /v2/health/ready and the ensemble's ready endpoint every 100 ms; records every miss."""

    def __init__(self, http_url: str):
        super().__init__(daemon=True)
        self.urls = [f"http://{http_url}/v2/health/ready", f"http://{http_url}/v2/models/classify/ready"]
        self.polls, self.misses, self.stop_event = 0, [], threading.Event()

    def run(self):
        while not self.stop_event.is_set():
            for url in self.urls:
                try:
                    with urllib.request.urlopen(url, timeout=5) as r:
                        ok = r.status == 200
                except Exception as err:  # noqa: BLE001
                    ok, r = False, err
                self.polls += 1
                if not ok:
                    self.misses.append((time.strftime("%H:%M:%S"), url, str(r)))
            self.stop_event.wait(0.1)


def test_1000_mixed_requests_at_concurrency_16_good_answered_bad_refused_server_ready(served):
    import tritonclient.grpc as g
    import tritonclient.http as h
    from tritonclient.utils import InferenceServerException

    server, images, ref, classes = served["server"], served["images"], served["ref"], served["classes"]
    bad = bad_payloads(images)
    rng = random.Random(0)
    # ~60% good (each sample photo), the rest spread over the bad kinds; the 21 MB body only 5 times.
    spread = [k for k in bad if "oversize" not in k]
    kinds = [f"good:{n}" for n in images] * 75 + spread * ((TOTAL - 600 - 5) // len(spread)) + ["oversize body (21 MB)"] * 5
    kinds = kinds + [f"good:{n}" for n in images] * ((TOTAL - len(kinds)) // len(images) + 1)
    kinds = kinds[:TOTAL]   # only good ones are cut: every bad kind keeps its count
    rng.shuffle(kinds)
    assert len(kinds) == TOTAL
    local = threading.local()
    shed: list[str] = []

    def client(protocol):
        key = f"c_{protocol}"
        if not hasattr(local, key):
            setattr(local, key, g.InferenceServerClient(server.grpc_url) if protocol == "grpc"
                    else h.InferenceServerClient(server.http_url, connection_timeout=60, network_timeout=60))
        return getattr(local, key)

    def one(i: int):
        kind = kinds[i]
        protocol = "grpc" if i % 2 == 0 else "http"
        mod = g if protocol == "grpc" else h
        if kind.startswith("good:"):
            arr, dtype = np.frombuffer(images[kind[5:]], np.uint8)[None], "UINT8"
        else:
            arr, dtype, _ = bad[kind]
        inp = mod.InferInput("image", list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        for attempt in range(20):
            try:
                res = client(protocol).infer("classify", [inp], outputs=[mod.InferRequestedOutput("probabilities", class_count=3)])
                return kind, protocol, "ok", [e.decode() if isinstance(e, bytes) else e for e in res.as_numpy("probabilities")[0]]
            except InferenceServerException as err:
                # Load shed by the byte-bounded python queue (13 requests of up to 40 MB against 16 in flight): the
                # server is healthy and says "later", and the client retries it (serve/client.py); anything else ends.
                if any(m in str(err).lower() for m in SHED_MESSAGES) and attempt < 19:
                    shed.append(kind)
                    time.sleep(0.2 + 0.1 * attempt)
                    continue
                return kind, protocol, str(err.status()), str(err)

    poller = ReadinessPoller(server.http_url)
    poller.start()
    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(one, range(TOTAL)))
    finally:
        poller.stop_event.set()
        poller.join(10)
    wall = time.perf_counter() - t0

    assert len(results) == TOTAL
    tally, wrong = Counter(), []
    for kind, protocol, status, payload in results:
        if kind.startswith("good:"):
            name = kind[5:]
            want = int(ref[name].argmax())
            if status != "ok":
                wrong.append((kind, protocol, status, payload[:200]))
                continue
            score, index, label = payload[0].split(":", 2)
            if int(index) != want or label != classes[want] or abs(float(score) - float(ref[name].max())) > 1e-4:
                wrong.append((kind, protocol, payload))
            tally["good answered correctly"] += 1
        else:
            needle = bad[kind][2]
            if status not in CLIENT_ERROR or needle.lower() not in payload.lower():
                wrong.append((kind, protocol, status, payload[:300]))
            tally[f"refused 4xx: {kind}"] += 1
    assert not wrong, (Counter(w[0] for w in wrong), wrong[:5])
    assert poller.polls > 20 and not poller.misses, (poller.polls, poller.misses[:5])
    assert server.proc.poll() is None and server.is_ready()
    print(f"\nRELIABILITY mixed load: {TOTAL} requests, concurrency {CONCURRENCY}, {wall:.1f} s "
          f"({TOTAL / wall:.1f} req/s), readiness polls {poller.polls} misses 0; {dict(tally)}; load-shed answers "
          f"retried: {len(shed)}")


def test_every_listening_socket_of_the_local_server_is_loopback(served):
    import psutil

    server = served["server"]
    root = psutil.Process(server.proc.pid)
    listening = []
    for p in [root] + root.children(recursive=True):  # tritonserver and its python stubs
        listening += [c for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    ports = {c.laddr.port for c in listening}
    assert {server.http_port, server.grpc_port, server.metrics_port} <= ports, (ports, listening)
    def ipv4(ip: str):  # gRPC listens on an IPv6 socket bound to ::ffff:127.0.0.1, which is still loopback only
        a = ipaddress.ip_address(ip)
        return getattr(a, "ipv4_mapped", None) or a

    assert all(ipv4(c.laddr.ip) == ipaddress.ip_address("127.0.0.1") for c in listening), \
        [(c.laddr.ip, c.laddr.port) for c in listening]
    # ... and from this host's other addresses the ports are closed.
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not a.address.startswith("127.")]
    assert others, "this host has no address besides loopback, so a connection from the network cannot be tried"
    for addr in others:
        for port in (server.http_port, server.grpc_port, server.metrics_port):
            with socket.socket() as sock:
                sock.settimeout(2)
                assert sock.connect_ex((addr, port)) != 0, (addr, port)
    print(f"\nRELIABILITY sockets: {sorted((c.laddr.ip, c.laddr.port) for c in listening)}; refused from {others}")


def test_server_restart_under_load_every_request_ends_answered(served):
    """16 client threads send 240 good requests with the client's retry policy (tenacity, exponential backoff with
    jitter, bounded); the server is stopped (SIGTERM) and started again on the same ports while they run. Every request
    must end in an answer (correct top-1) or a final error; with the restart inside the retry budget, all are answered."""
    from serve.client import TritonClassifier
    from serve.server import TritonServer

    old = served["server"]
    images, ref, classes = served["images"], served["ref"], served["classes"]
    names = list(images) * 30
    clf = TritonClassifier(old.grpc_url, "grpc", max_attempts=40, max_retry_seconds=90)
    results = [None] * len(names)
    done = threading.Semaphore(0)

    def one(i: int):
        results[i] = clf.classify_bytes(images[names[i]], k=1, name=names[i])
        done.release()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(one, i) for i in range(len(names))]
        for _ in range(40):  # the load is running: 40 answers came back
            assert done.acquire(timeout=120)
        stopped_at = time.perf_counter() - t0
        old.stop()
        try:
            served["server"] = new = TritonServer(served["repo"], http_port=old.http_port, grpc_port=old.grpc_port,
                                                  metrics_port=old.metrics_port, ready_timeout=240)
            new.start()
        except BaseException:
            for f in futures:
                f.cancel()  # the in-flight ones end within their retry budget
            raise
        ready_at = time.perf_counter() - t0
        for f in futures:
            f.result(timeout=300)
    assert all(r is not None for r in results), "a request never returned"
    failed = [(r.path, r.error, r.attempts) for r in results if not r.ok]
    assert not failed, failed[:10]
    for r in results:
        want = int(ref[r.path].argmax())
        assert r.top[0].label == classes[want] and abs(r.top[0].score - float(ref[r.path].max())) < 1e-4, r
    retried = sum(r.attempts > 1 for r in results)
    assert retried > 0, "no request was in flight during the restart"
    print(f"\nRELIABILITY restart: {len(results)} requests, stopped at {stopped_at:.1f} s, ready again at {ready_at:.1f} s, "
          f"{retried} retried (max attempts {max(r.attempts for r in results)}), 0 lost, 0 failed")


def _stubs(server, model: str = "") -> list:
    """The server's python backend stub processes (one per python model instance), optionally for one model."""
    import psutil

    found = []
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "triton_python_backend_stub" in cmd and model in cmd:
            found.append(p)
    return found


def _load(served, n: int, on_answers: int, fault) -> tuple[list, float]:
    """16 threads send ``n`` good requests with the client's retry policy; after ``on_answers`` answers ``fault()``
    runs. Returns the results (every request ends: an answer or a final error) and the fault's time."""
    from serve.client import TritonClassifier

    images = served["images"]
    names = list(images) * (n // len(images) + 1)
    names = names[:n]
    clf = TritonClassifier(served["server"].grpc_url, "grpc", max_attempts=40, max_retry_seconds=90)
    results = [None] * n
    done = threading.Semaphore(0)

    def one(i: int):
        results[i] = clf.classify_bytes(images[names[i]], k=1, name=names[i])
        done.release()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        for _ in range(on_answers):
            assert done.acquire(timeout=120)
        at = time.perf_counter() - t0
        fault()
        for f in futures:
            f.result(timeout=300)
    assert all(r is not None for r in results), "a request never returned"
    return results, at


def _assert_answers_right(served, results) -> None:
    ref, classes = served["ref"], served["classes"]
    for r in results:
        if r.ok:
            want = int(ref[r.path].argmax())
            assert r.top[0].label == classes[want] and abs(r.top[0].score - float(ref[r.path].max())) < 1e-4, r


def _running(proc) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_server_sigkill_under_load_every_request_ends_answered_and_no_stub_outlives_it(served):
    """SIGKILL of tritonserver itself (no graceful shutdown) while 16 threads send 240 requests; a new server starts on
    the same ports at once. Every request ends answered with the right top-1 (the retry policy rides over the outage),
    and no python stub of the killed server outlives its TritonServer's stop(). Triton's stubs watch their parent and
    mostly exit by themselves (~60 s, measured and printed), but one once ran for over 150 s (see TritonServer.stop)."""
    import psutil

    from serve.server import TritonServer

    old = served["server"]
    orphans = _stubs(old)
    assert len(orphans) >= 2, orphans   # preprocess + guard/postprocess models run as python stubs

    def kill_and_restart():
        old.proc.kill()
        old.proc.wait(30)
        new = TritonServer(served["repo"], http_port=old.http_port, grpc_port=old.grpc_port,
                           metrics_port=old.metrics_port, ready_timeout=240)
        served["server"] = new
        new.start()

    t_kill = time.perf_counter()
    try:
        results, at = _load(served, 240, 40, kill_and_restart)
        # How long the stubs take by themselves (information: ~56 s on a quiet host, never for a blocked one) ...
        gone, alive = psutil.wait_procs(orphans, timeout=30)
        by_themselves = [q for q in orphans if not _running(q)]
        stub_exit_s = time.perf_counter() - t_kill
        # ... and what the product guarantees: stop() of the dead server's TritonServer leaves none running.
        old.stop()
        gone, alive = psutil.wait_procs(orphans, timeout=3)
        alive = [q for q in alive if _running(q)]   # a zombie has exited; only a PID 1 that does not reap keeps it
    finally:
        for p in orphans:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    failed = [(r.path, r.error, r.attempts) for r in results if not r.ok]
    assert not failed, failed[:10]
    _assert_answers_right(served, results)
    retried = sum(r.attempts > 1 for r in results)
    assert retried > 0, "no request was in flight during the outage"
    assert not alive, f"python stubs of the killed server still running after its stop(): {alive}"
    print(f"\nRELIABILITY server SIGKILL: killed at {at:.1f} s, {len(results)} answered, {retried} retried (max "
          f"{max(r.attempts for r in results)} attempts), 0 failed; {len(by_themselves)} of {len(orphans)} old stubs "
          f"had exited by themselves {stub_exit_s:.1f} s after the load began, none ran after stop()")


def test_a_stub_crash_during_serve_evaluate_counts_errors_never_misses(served, tmp_path):
    """`serve evaluate` over 200 images filed under the class the server answers for each (so every answer is a hit);
    the `preprocess` stubs are SIGKILLed 2 s in. The requests they fail are errors, not misses: top-1 over the
    answered images stays 1.0, ``answered + errors == images``, and each failure names the stub."""
    from serve.evaluate import evaluate_folder, format_report
    from serve.server import TritonServer

    server = served["server"]
    ref, classes = served["ref"], served["classes"]
    folder = tmp_path / "eval"
    for name, data in served["images"].items():
        d = folder / classes[int(ref[name].argmax())]
        d.mkdir(parents=True, exist_ok=True)
        for i in range(25):
            (d / f"{i:02d}-{name}").write_bytes(data)
    victims = _stubs(server, "preprocess")
    killer = threading.Timer(2.0, lambda: [p.kill() for p in victims])
    try:
        killer.start()
        r = evaluate_folder(server.grpc_url, folder, "grpc", progress=False, concurrency=2, max_attempts=2,
                            max_retry_seconds=5)
    finally:
        killer.cancel()
        server.stop()
        served["server"] = TritonServer(served["repo"], http_port=server.http_port, grpc_port=server.grpc_port,
                                        metrics_port=server.metrics_port, ready_timeout=240).start()
    n = len(served["images"]) * 25
    assert r["images"] == n and r["answered"] + r["errors"] == n, r
    assert r["errors"] > 0 and r["answered"] > 0, (r["answered"], r["errors"])
    assert r["top1"] == 1.0, (r["top1"], r["answered"], r["errors"])   # counted as misses it would be answered / n
    assert all("Stub process" in f["error"] for f in r["failures"]), r["failures"][:3]
    assert f"over {r['answered']} answered  errors {r['errors']}" in format_report(r)
    print(f"\nRELIABILITY evaluate with a stub crash: {r['answered']} answered (top-1 {r['top1']}), {r['errors']} errors")


def test_python_stub_sigkill_under_load_fails_alone_and_the_server_recovers(served):
    """SIGKILL of the `preprocess` python stubs while 16 threads send 240 requests: the requests that reach them end in
    a final error naming the stub (a server-side failure is not retried), every other request is answered with the
    right top-1, no request hangs, the server process stays up. Known gap of Triton, measured here: 2.51 does not
    restart a python stub killed this way; the model answers 'Stub process ... is not healthy' until the server
    restarts, while the server's readiness stays 200 (recorded as an expected failure until that changes). What
    recovers it: `serve up` exits 3 naming the model (tests/test_serve_up_stub.py), and the Triton pods' liveness probe
    is readiness, which Triton >= 26.04 turns false for a dead stub (tests/test_k8s_manifests.py)."""
    from serve.client import TritonClassifier
    from serve.server import TritonServer

    server = served["server"]
    victims = _stubs(server, "preprocess")
    assert victims, _stubs(server)

    def kill_stub():
        for p in victims:
            p.kill()

    try:
        results, at = _load(served, 240, 40, kill_stub)
        failed = [r for r in results if not r.ok]
        # (a request may first be retried for a transient reason, then end on the stub's error)
        assert all("Stub process" in r.error and "is not healthy" in r.error for r in failed), \
            Counter((r.error[:200], r.attempts) for r in failed)
        _assert_answers_right(served, results)
        assert server.proc.poll() is None
        ready = server.is_ready()
        clf = TritonClassifier(server.grpc_url, "grpc", max_attempts=3)
        name = next(iter(served["images"]))
        deadline, after = time.time() + 30, None
        while time.time() < deadline:
            after = clf.classify_bytes(served["images"][name], k=1, name=name)
            if after.ok:
                break
            time.sleep(2)
    finally:   # the module's later tests get a healthy server on the same ports
        server.stop()
        served["server"] = TritonServer(served["repo"], http_port=server.http_port, grpc_port=server.grpc_port,
                                        metrics_port=server.metrics_port, ready_timeout=240).start()
    print(f"\nRELIABILITY stub SIGKILL: killed at {at:.1f} s, {len(results) - len(failed)} answered, {len(failed)} "
          f"final errors ({failed[0].error[:120] if failed else '-'}); server ready {ready}; answering again within "
          f"30 s: {after.ok}")
    if not after.ok:
        pytest.xfail(f"Triton did not restart the killed python stub within 30 s ({after.error}); server ready: {ready}; "
                     "'serve up' and the pods' liveness probe restart the server instead")
    _assert_answers_right(served, [after])
