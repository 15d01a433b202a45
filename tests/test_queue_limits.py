"""The bounded REJECT queue of every batched model, from the real config writers: the queue timeout sheds load, and
max_queue_size bounds the BYTES a queue holds (serve/model_config.py). A python model that queues encoded requests
(preprocess, guard, the DALI preprocess) holds at most QUEUE_BYTES_BUDGET of them; the classifier's fixed-size pixels
are bounded by count."""
from __future__ import annotations

from types import SimpleNamespace

from serve.model_config import QUEUE_BYTES_BUDGET
from serve.repository import classifier_config, postprocess_config, preprocess_config
from serve.repository_dali import dali_preprocess_config, guard_config
from train.config import load_config

MIB = 2**20


def _queue(cfg) -> tuple[int, int, int]:
    q = cfg.dynamic_batching.default_queue_policy
    return q.timeout_action, q.max_queue_size, q.default_timeout_microseconds


def test_encoded_request_queues_are_bounded_in_bytes_and_the_timeout_sheds():
    s = load_config("imagenet").serve
    assert (s.max_batch_size, s.max_request_bytes) == (64, 40_000_000)
    size = s.max_request_bytes
    # 512 MiB / 40 MB = floor(536870912 / 40000000) = 13 requests, not 4 x 64 = 256 (10 GB against a 16 Gi pod).
    assert QUEUE_BYTES_BUDGET == 512 * MIB
    for cfg in (preprocess_config(s, 224, 1000, instances=12), guard_config(s, 12, size),
                dali_preprocess_config(s, 224, 1000)):
        action, n, timeout_us = _queue(cfg)
        assert action == cfg.dynamic_batching.default_queue_policy.REJECT, cfg.name
        assert n == 536870912 // 40_000_000 == 13, (cfg.name, n)
        assert n * size <= QUEUE_BYTES_BUDGET, cfg.name
        assert timeout_us == 2_000_000, cfg.name   # the primary shed: 2 s, 20x the 100 ms p99 SLO
    # The classifier queues fixed-size pixels by count: 4 x 64 requests of 3 x 224 x 224 float32 = 154 MB (147 MiB).
    cls = classifier_config("onnx", s, 224, 1000)
    action, n, timeout_us = _queue(cls)
    assert (n, timeout_us) == (256, 2_000_000)
    assert n * 3 * 224 * 224 * 4 == 154_140_672 < QUEUE_BYTES_BUDGET
    assert _queue(postprocess_config(s, 1000))[1:] == (256, 2_000_000)


def test_a_request_larger_than_the_budget_still_queues_one_and_overrides_win():
    s = load_config("imagenet", ["serve.max_request_bytes=1000000000"]).serve
    assert _queue(preprocess_config(s, 224, 1000))[1] == 1   # at least one request, or nothing could be served
    s = SimpleNamespace(**s.model_dump(), max_queue_size=7, queue_timeout_ms=250)   # as serve repository passes them
    for cfg in (preprocess_config(s, 224, 1000), classifier_config("cpu", s, 224, 1000)):
        assert _queue(cfg)[1:] == (7, 250_000), cfg.name
