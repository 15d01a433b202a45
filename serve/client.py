"""Clients of the `classify` ensemble (or the bare classifier) over gRPC or HTTP: concurrent, with bounded retries (tenacity)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential, wait_random

from serve.contract import ENSEMBLE, ENSEMBLE_INPUT, OUTPUT_NAME
from serve.errors import ServeError

INPUT = ENSEMBLE_INPUT
OUTPUT = OUTPUT_NAME


@dataclass
class Prediction:
    label: str
    score: float
    index: int


@dataclass
class FileResult:
    path: str
    top: list[Prediction] = field(default_factory=list)
    latency_ms: float = 0.0
    attempts: int = 1
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


def parse_classification(entries: Sequence[bytes | str]) -> list[Prediction]:
    """Triton's classification extension answers 'score:index:label' strings, best first."""
    out = []
    for e in entries:
        s = e.decode() if isinstance(e, bytes) else str(e)
        score, index, *label = s.split(":", 2)
        out.append(Prediction(label[0] if label else index, float(score), int(index)))
    return out


def _status(err: Exception) -> str:
    status = getattr(err, "status", None)
    return str(status() if callable(status) else status or "")


# Triton sheds load with these (serve/model_config.py: a bounded REJECT queue on every batched model), as gRPC
# UNAVAILABLE / HTTP 503. They are retried with the backoff below: the server is healthy and said "later", and the
# exponential wait with jitter spreads the retries out; the attempts and seconds are bounded, so under sustained
# overload the request still ends, with this message as its final error.
SHED_MESSAGES = ("exceeds maximum queue size", "request timeout expired")


def is_transient(err: Exception) -> bool:
    """Worth retrying: the server is unreachable, restarting, or overloaded (a queue-full or queue-timeout rejection);
    never a rejected (4xx) request."""
    from tritonclient.utils import InferenceServerException

    if isinstance(err, (ConnectionError, TimeoutError, OSError)) and not isinstance(err, InferenceServerException):
        return True
    if isinstance(err, InferenceServerException):
        st, msg = _status(err), str(err).lower()
        if "larger than max" in msg:   # gRPC's RESOURCE_EXHAUSTED for an over-size message: the same bytes fail again
            return False
        if st in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED", "503", "502", "504"):
            return True
        if any(s in msg for s in ("failed to connect", "connection refused", "connection reset", "unavailable",
                                  "socket closed", "broken pipe", "is not ready", "not found, model", "unknown model")
               + SHED_MESSAGES):
            return True
    return False


def retrying(max_attempts: int = 6, max_seconds: float = 60.0) -> Retrying:
    """Bounded retry policy: exponential backoff (0.2 s doubling up to 5 s) plus up to 1 s of jitter, at most
    ``max_attempts`` or ``max_seconds``."""
    return Retrying(retry=retry_if_exception(is_transient), stop=stop_after_attempt(max_attempts) | stop_after_delay(max_seconds),
                    wait=wait_exponential(multiplier=0.2, max=5.0) + wait_random(0, 1.0), reraise=True)


class TritonClassifier:
    """One connection per thread to a Triton server, asking for top-k through the classification extension."""

    def __init__(self, url: str, protocol: str = "grpc", model: str = ENSEMBLE, timeout_s: float = 60.0,
                 max_attempts: int = 6, max_retry_seconds: float = 60.0):
        if protocol not in ("grpc", "http"):
            raise ServeError(f"unknown protocol '{protocol}'; use grpc or http.")
        self.url = url.removeprefix("http://").removeprefix("grpc://")
        self.protocol, self.model, self.timeout_s = protocol, model, timeout_s
        self.max_attempts, self.max_retry_seconds = max_attempts, max_retry_seconds
        self._local = threading.local()
        if protocol == "grpc":
            import tritonclient.grpc as mod
        else:
            import tritonclient.http as mod
        self._mod = mod

    def _client(self):
        c = getattr(self._local, "client", None)
        if c is None:
            if self.protocol == "grpc":
                c = self._mod.InferenceServerClient(self.url)
            else:
                c = self._mod.InferenceServerClient(self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s)
            self._local.client = c
        return c

    def _deadline(self) -> dict:
        """Per-call timeout: gRPC takes it per call (DEADLINE_EXCEEDED), the HTTP client has it from its constructor
        (connection and network timeouts), so a server that accepts connections and never answers ends every call."""
        return {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}

    def check(self, k: int = 5, input_name: str = INPUT) -> int:
        """Before any image is sent: the server answers (with the retry policy), the model is ready, takes encoded
        bytes (a UINT8 ``input_name``) and answers ``OUTPUT``, and 1 <= k <= its classes. Returns the class count;
        every problem is one ServeError sentence."""
        from tritonclient.utils import InferenceServerException

        c = self._client()
        deadline = self._deadline()
        try:
            for attempt in retrying(self.max_attempts, self.max_retry_seconds):
                with attempt:
                    if not c.is_server_live(**deadline):
                        raise ConnectionError("server not live")
        except Exception as err:  # noqa: BLE001 - the final error of the retry policy
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ServeError(f"cannot reach a Triton server at {self.url} over {self.protocol} ({first}; {self.timeout_s:g} s "
                             "per try); start one with 'python -m serve up', fix --url/--protocol, or raise --timeout.") from None
        try:
            ready = c.is_model_ready(self.model, **deadline)
            meta = c.get_model_metadata(self.model, **({"as_json": True} if self.protocol == "grpc" else {}),
                                        **deadline) if ready else None
        except (InferenceServerException, OSError) as err:   # OSError: the HTTP client's network timeout
            if is_transient(err):
                raise ServeError(f"the Triton server at {self.url} did not answer whether '{self.model}' is ready "
                                 f"({(str(err).splitlines() or [type(err).__name__])[0]}); check the server, or raise --timeout.") from None
            ready, meta = False, None
        if not ready:
            raise ServeError(f"model '{self.model}' is not ready on {self.url}; pass --model with a served model (default '{ENSEMBLE}').")
        inputs = {i["name"]: i for i in meta.get("inputs", [])}
        outputs = {o["name"]: o for o in meta.get("outputs", [])}
        if inputs.get(input_name, {}).get("datatype") != "UINT8" or OUTPUT not in outputs:
            got = ", ".join(f"{n} {i.get('datatype')}" for n, i in inputs.items())
            raise ServeError(f"model '{self.model}' takes {got}, not encoded images ({input_name} UINT8) with a '{OUTPUT}' "
                             f"output; pass --model {ENSEMBLE}.")
        n = int(outputs[OUTPUT]["shape"][-1])
        if not 1 <= k <= n:
            raise ServeError(f"-k {k} is out of range: model '{self.model}' has {n} classes; pass -k between 1 and {n}.")
        return n

    def infer_array(self, array: np.ndarray, input_name: str = INPUT, k: int = 5) -> list[list[Prediction]]:
        """One request with a batched input array; returns top-k per batch row. Retries transient failures."""
        dtype = {np.uint8: "UINT8", np.float32: "FP32"}.get(array.dtype.type)
        if dtype is None:
            dtype = self._mod.np_to_triton_dtype(array.dtype) if hasattr(self._mod, "np_to_triton_dtype") else str(array.dtype).upper()
        inp = self._mod.InferInput(input_name, list(array.shape), dtype)
        inp.set_data_from_numpy(array)
        out = self._mod.InferRequestedOutput(OUTPUT, class_count=k)
        res = self._client().infer(self.model, [inp], outputs=[out], **self._deadline())
        arr = res.as_numpy(OUTPUT)
        if arr is None or arr.size == 0:
            raise ServeError(f"'{self.model}' answered an empty '{OUTPUT}' tensor (numpy>=2 in the python stub's environment?).")
        return [parse_classification(row) for row in arr.reshape(array.shape[0], -1)]

    def classify_bytes(self, data: bytes, k: int = 5, name: str = "") -> FileResult:
        """Classify one encoded image with the retry policy; never raises: errors land in ``FileResult.error``."""
        result = FileResult(path=name)
        arr = np.frombuffer(data, dtype=np.uint8)[None, :]
        t0 = time.perf_counter()
        try:
            for attempt in retrying(self.max_attempts, self.max_retry_seconds):
                with attempt:
                    result.attempts = attempt.retry_state.attempt_number
                    result.top = self.infer_array(arr, k=k)[0]
        except Exception as err:  # noqa: BLE001 - every request ends in an answer or a final error
            result.error = str(err).splitlines()[0] if str(err) else type(err).__name__
        result.latency_ms = (time.perf_counter() - t0) * 1e3
        return result


def classify_files(paths: Iterable[str | Path], url: str, protocol: str = "grpc", k: int = 5, model: str = ENSEMBLE,
                   concurrency: int = 8, progress: bool = False, max_attempts: int = 6,
                   max_retry_seconds: float = 60.0, check: bool = True, timeout_s: float = 60.0) -> list[FileResult]:
    """Classify image files concurrently; results in input order, each with top-k, latency and any final error.

    With ``check`` (default) the server, ``model`` and ``k`` are validated first (TritonClassifier.check)."""
    from serve.images import find_images

    files = find_images(paths)
    if not files:
        raise ServeError("no image files found; pass JPEG/PNG files or folders of them.")
    clf = TritonClassifier(url, protocol, model, timeout_s=timeout_s, max_attempts=max_attempts,
                           max_retry_seconds=max_retry_seconds)
    if check:
        clf.check(k)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), unit="img", desc=f"classify ({protocol} {clf.url})")

    def one(p: Path) -> FileResult:
        try:
            data = p.read_bytes()
        except OSError as err:
            return FileResult(str(p), error=f"cannot read file: {err}")
        r = clf.classify_bytes(data, k=k, name=str(p))
        if bar is not None:
            bar.update(1)
        return r

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        results = list(pool.map(one, files))
    if bar is not None:
        bar.close()
    return results
