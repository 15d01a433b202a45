"""The client's retry rules (serve.client.is_transient), one row per error a user meets: retried only when the server is
unreachable, restarting or shedding load; never a refused request, an over-size message or a server-side failure.
The exceptions are built as tritonclient builds them: gRPC errors carry ``str(rpc_error.code())`` as their status
(tritonclient/grpc/_utils.py get_error_grpc), HTTP errors the response's status code (tritonclient/http/_utils.py
_get_error)."""
import pytest
from tritonclient.utils import InferenceServerException

from serve.client import is_transient

ROWS = [
    # (what happened, error, retried?)
    ("no server listening", ConnectionRefusedError(111, "Connection refused"), True),
    ("gRPC: server down or restarting",
     InferenceServerException("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:8001: "
                              "Failed to connect to remote host: Connection refused", "StatusCode.UNAVAILABLE"), True),
    ("HTTP: model not loaded yet after a restart",
     InferenceServerException("Request for unknown model: 'classify' is not found", "400"), True),
    ("gRPC: queue full (load shed)", InferenceServerException("Exceeds maximum queue size", "StatusCode.UNAVAILABLE"),
     True),
    ("HTTP: queue full (load shed)", InferenceServerException("Exceeds maximum queue size", "503"), True),
    ("gRPC: queued past its timeout", InferenceServerException("Request timeout expired", "StatusCode.UNAVAILABLE"),
     True),
    # By status alone (a message none of the text rules match): a proxy or load balancer in front of Triton answers
    # these for a pod that is gone or draining.
    ("gRPC UNAVAILABLE from a proxy (status only)", InferenceServerException("upstream connect error", "StatusCode.UNAVAILABLE"),
     True),
    ("HTTP 503 from a proxy (status only)", InferenceServerException("no healthy upstream", "503"), True),
    ("HTTP 502 from a proxy (status only)", InferenceServerException("bad gateway", "502"), True),
    ("HTTP 504 from a proxy (status only)", InferenceServerException("gateway timeout", "504"), True),
    ("gRPC: deadline of the client's timeout", InferenceServerException("Deadline Exceeded",
                                                                        "StatusCode.DEADLINE_EXCEEDED"), True),
    ("gRPC: over-size request (server's receive limit)",
     InferenceServerException("Received message larger than max (21000270 vs. 4194304)",
                              "StatusCode.RESOURCE_EXHAUSTED"), False),
    ("gRPC: over-size request (client's send limit)",
     InferenceServerException("Sent message larger than max (2147483700 vs. 2147483647)",
                              "StatusCode.RESOURCE_EXHAUSTED"), False),
    ("HTTP 500: python stub crashed",
     InferenceServerException("in ensemble 'classify', Failed to process the request(s) for model instance "
                              "'preprocess_0_0', message: Stub process 'preprocess_0_0' is not healthy.", "500"), False),
    ("gRPC INTERNAL: python stub crashed",
     InferenceServerException("in ensemble 'classify', Failed to process the request(s) for model instance "
                              "'preprocess_0_0', message: Stub process 'preprocess_0_0' is not healthy.",
                              "StatusCode.INTERNAL"), False),
    ("HTTP 400: not an image", InferenceServerException("preprocess accepts JPEG and PNG only", "400"), False),
    ("gRPC INVALID_ARGUMENT: decompression bomb",
     InferenceServerException("image of 50000x50000 = 2500000000 pixels, over the limit of 40000000",
                              "StatusCode.INVALID_ARGUMENT"), False),
    ("a bug in our code", ValueError("bad"), False),
]


@pytest.mark.parametrize("what, err, retried", ROWS, ids=[r[0] for r in ROWS])
def test_retry_rules(what, err, retried):
    assert is_transient(err) is retried, what
