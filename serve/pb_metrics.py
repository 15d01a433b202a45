"""Custom Triton metrics recorded by the python-backend models (keep these names: dashboards and alerts use them).

Imported inside the python stub; ``pb_utils`` is passed in because it only exists there.
"""
from __future__ import annotations

import numpy as np

CONFIDENCE_METRIC = "seresnet_prediction_confidence"
CLASS_METRIC = "seresnet_predicted_class_total"
CONFIDENCE_BUCKETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]


class PredictionMetrics:
    """Top-1 softmax probability histogram and predicted-class counter, labelled by model (and class)."""

    def __init__(self, pb_utils, model: str, classes: list[str]):
        # The families must stay referenced as long as their metrics are used ("MetricFamily has been deleted").
        self.confidence_family = pb_utils.MetricFamily(
            name=CONFIDENCE_METRIC, description="Top-1 softmax probability of served predictions",
            kind=pb_utils.MetricFamily.HISTOGRAM)
        self.class_family = pb_utils.MetricFamily(
            name=CLASS_METRIC, description="Served predictions by top-1 class", kind=pb_utils.MetricFamily.COUNTER)
        self.confidence = self.confidence_family.Metric(labels={"model": model}, buckets=CONFIDENCE_BUCKETS)
        self.classes = list(classes)
        self.per_class = [self.class_family.Metric(labels={"model": model, "class": c}) for c in self.classes]

    def record(self, probabilities: np.ndarray) -> None:
        if probabilities.size == 0:
            return
        top = probabilities.argmax(axis=1)
        for idx, p in zip(top.tolist(), probabilities.max(axis=1).tolist()):
            self.confidence.observe(float(p))
            if 0 <= idx < len(self.per_class):
                self.per_class[idx].increment(1)
