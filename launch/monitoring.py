"""Monitoring as code: Grafana dashboards (grafanalib) and the PrometheusRule wrapper of the rule file.

``python -m launch.monitoring`` regenerates ``k8s/monitoring/dashboards/*.json`` and
``k8s/monitoring/prometheusrule.yaml``; ``--check`` fails when the committed files differ (a test runs it).
``promql_expressions()`` lists every PromQL expression the dashboards and rules use, for the live test.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
MONITORING_DIR = REPO_ROOT / "k8s" / "monitoring"
RULES_FILE = MONITORING_DIR / "rules" / "seresnet.rules.yaml"
PROMETHEUS_RULE_FILE = MONITORING_DIR / "prometheusrule.yaml"
DASHBOARD_DIR = MONITORING_DIR / "dashboards"

# Grafana substitutes these before a query reaches Prometheus; the live test does the same.
GRAFANA_VARIABLES = {"$__rate_interval": "1m"}
# Series that exist only where Triton sees a GPU (nv_gpu_*); on a CPU-only host they have no data.
GPU_ONLY_METRICS = ("nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes")

DATASOURCE = "${datasource}"
# Triton model names the panels filter on: serve.contract.ENSEMBLE / CLASSIFIER (launch does not import serve;
# tests/test_monitoring.py holds them equal).
ENSEMBLE = "classify"      # what clients call: request rate, errors, latency
CLASSIFIER = "se_resnet50"  # the GPU model: queueing, pending requests (HPA)


def _dashboard_lib():
    try:
        import grafanalib.core as g
        from grafanalib._gen import DashboardEncoder
    except ImportError:  # pragma: no cover - the cluster extra installs it
        sys.exit("grafanalib is not installed; install the cluster extra: pip install -e '.[cluster]'.")
    return g, DashboardEncoder


def _timeseries(g, title, targets, x, y, unit="", w=12, h=8, description=None, stacking=None, **kw):
    return g.TimeSeries(
        title=title, dataSource=DATASOURCE, description=description, unit=unit,
        targets=[g.Target(expr=e, legendFormat=l, refId=chr(ord("A") + i)) for i, (e, l) in enumerate(targets)],
        gridPos=g.GridPos(h=h, w=w, x=x, y=y), stacking=stacking or {}, **kw)


def _templating(g):
    return g.Templating(list=[
        g.Template(name="datasource", query="prometheus", type="datasource", label="Data source", default="Prometheus"),
    ])


def serving_dashboard():
    g, _ = _dashboard_lib()
    # Request-level series count the `classify` ensemble only (Triton also counts each composing model: summing
    # over models reads ~4x the requests and ~2x the errors); queueing is the GPU model's (see the rule file).
    ens, gpu = f'model="{ENSEMBLE}"', f'model="{CLASSIFIER}"'
    per_req = f'clamp_min(sum by (model) (rate(nv_inference_request_success{{{ens}}}[$__rate_interval])), 1e-9)'
    per_gpu_req = f'clamp_min(sum by (model) (rate(nv_inference_request_success{{{gpu}}}[$__rate_interval])), 1e-9)'
    panels = [
        g.Stat(title="Ready Triton pods", dataSource=DATASOURCE, gridPos=g.GridPos(h=4, w=6, x=0, y=0),
               targets=[g.Target(expr="seresnet:triton_ready_pods", refId="A")], reduceCalc="last"),
        g.Stat(title="Requests / s", dataSource=DATASOURCE, gridPos=g.GridPos(h=4, w=6, x=6, y=0), format="reqps",
               targets=[g.Target(expr=f"sum(rate(nv_inference_request_success{{{ens}}}[$__rate_interval]))", refId="A")],
               reduceCalc="last"),
        g.Stat(title="Server error ratio (5m)", dataSource=DATASOURCE, gridPos=g.GridPos(h=4, w=6, x=12, y=0),
               format="percentunit", targets=[g.Target(expr="max(seresnet:triton_error_ratio:5m)", refId="A")],
               reduceCalc="last"),
        g.Stat(title="Worst p99 latency", dataSource=DATASOURCE, gridPos=g.GridPos(h=4, w=6, x=18, y=0), format="s",
               targets=[g.Target(expr="max(seresnet:triton_request_latency_p99_seconds)", refId="A")],
               reduceCalc="last"),
        _timeseries(g, "Request latency p50 / p95 / p99 (worst pod)", [
            (f'max by (model) (nv_inference_request_summary_us{{{ens},quantile="0.5"}}) / 1e6', "{{model}} p50"),
            (f'max by (model) (nv_inference_request_summary_us{{{ens},quantile="0.95"}}) / 1e6', "{{model}} p95"),
            (f'max by (model) (nv_inference_request_summary_us{{{ens},quantile="0.99"}}) / 1e6', "{{model}} p99"),
        ], x=0, y=4, unit="s",
            description="Triton 2.51 publishes latency quantiles per pod (--metrics-config summary_latencies=true); "
                        "the panel shows the worst pod, matching the p99 SLO alert (100 ms)."),
        _timeseries(g, "Mean request latency (all pods)", [
            (f"sum by (model) (rate(nv_inference_request_duration_us{{{ens}}}[$__rate_interval])) / {per_req} / 1e6", "{{model}}"),
        ], x=12, y=4, unit="s"),
        _timeseries(g, "Throughput per model (each model counts the same requests)", [
            ("sum by (model) (rate(nv_inference_count[$__rate_interval]))", "{{model}} inferences/s"),
            ("sum by (model) (rate(nv_inference_exec_count[$__rate_interval]))", "{{model}} executions/s"),
        ], x=0, y=12, unit="ops"),
        _timeseries(g, "Average dynamic batch size", [
            ("sum by (model) (rate(nv_inference_count[$__rate_interval])) / "
             "clamp_min(sum by (model) (rate(nv_inference_exec_count[$__rate_interval])), 1e-9)", "{{model}}"),
        ], x=12, y=12),
        _timeseries(g, "Queue vs compute time per request", [
            (f"sum by (model) (rate(nv_inference_queue_duration_us{{{gpu}}}[$__rate_interval])) / {per_gpu_req} / 1e6",
             "{{model}} queue"),
            (f"sum by (model) (rate(nv_inference_compute_infer_duration_us{{{gpu}}}[$__rate_interval])) / {per_gpu_req} / 1e6",
             "{{model}} compute"),
        ], x=0, y=20, unit="s"),
        _timeseries(g, "Pending requests of the classifier (HPA signal) and queue / compute ratio", [
            ("seresnet:triton_pending_requests", "{{model}} pending"),
            ("seresnet:triton_queue_compute_ratio:5m", "{{model}} queue/compute"),
        ], x=12, y=20,
            description="The HPA scales on the classifier's pending requests per pod through prometheus-adapter "
                        "(k8s/serving/base/hpa.yaml); the queue alert fires when queue/compute stays above 1."),
        _timeseries(g, "Failed classify requests by reason, and client rejections", [
            # Triton 2.51 adds the failing composing model's failure to the ensemble's: 2 per failed request.
            (f"sum by (model, reason) (rate(nv_inference_request_failure{{{ens}}}[$__rate_interval])) / 2", "{{model}} {{reason}}"),
            ("sum by (reason) (rate(seresnet_preprocess_rejected_total[$__rate_interval])) or vector(0)",
             "client image rejected: {{reason}}"),
        ], x=0, y=28, unit="reqps",
            description="Client rejections (undecodable or oversize images, INVALID_ARG) are part of the classify "
                        "failures; the server error ratio leaves them out."),
        _timeseries(g, "Server vs client error ratio (5m)", [
            ("seresnet:triton_error_ratio:5m", "{{model}} server errors (pages above 1%)"),
            ("seresnet:triton_client_error_ratio:5m", "{{model}} client rejections (warns above 5%)"),
        ], x=12, y=28, unit="percentunit"),
        _timeseries(g, "GPU utilisation", [("avg by (instance, gpu_uuid) (nv_gpu_utilization)", "{{instance}} {{gpu_uuid}}")],
                    x=0, y=36, unit="percentunit", description="GPU pods only (nv_gpu_*)."),
        _timeseries(g, "GPU memory used", [("sum by (instance, gpu_uuid) (nv_gpu_memory_used_bytes)", "{{instance}} {{gpu_uuid}}")],
                    x=12, y=36, unit="bytes", description="GPU pods only (nv_gpu_*)."),
        g.Heatmap(title="Top-1 confidence distribution", dataSource=DATASOURCE, gridPos=g.GridPos(h=8, w=12, x=0, y=44),
                  dataFormat="tsbuckets",
                  targets=[g.Target(expr="sum by (le) (rate(seresnet_prediction_confidence_bucket[$__rate_interval]))",
                                    legendFormat="{{le}}", format="heatmap", refId="A")]),
        _timeseries(g, "Mean top-1 confidence (30m vs 1d)", [
            ("seresnet:prediction_confidence_mean:30m", "{{model}} 30m"),
            ("seresnet:prediction_confidence_mean:1d", "{{model}} 1d"),
            ("histogram_quantile(0.5, sum by (le, model) (rate(seresnet_prediction_confidence_bucket[$__rate_interval])))",
             "{{model}} median"),
        ], x=12, y=44, unit="percentunit", description="The drift alert fires when the 30m mean falls below 85% of the 1d mean."),
        _timeseries(g, "Non-finite predictions (NaN/inf probabilities)", [
            ("seresnet:nonfinite_predictions:rate5m", "{{model}}"),
        ], x=0, y=60, w=24, h=6, unit="ops",
            description="Kept out of the confidence histogram; any at all pages (PredictionsNotFinite)."),
        _timeseries(g, "Predicted class distribution", [
            ("sum by (class) (rate(seresnet_predicted_class_total[$__rate_interval]))", "{{class}}"),
        ], x=0, y=52, w=24, unit="ops", stacking={"mode": "percent", "group": "A"}, fillOpacity=60),
    ]
    return g.Dashboard(title="seresnet / Triton serving", uid="seresnet-serving", tags=["seresnet", "triton"],
                       timezone="browser", refresh="30s", time=g.Time("now-3h", "now"),
                       templating=_templating(g), panels=panels).auto_panel_ids()


def training_dashboard():
    g, _ = _dashboard_lib()
    panels = [
        _timeseries(g, "Images / s (job)", [
            ("sum by (job) (seresnet_train_images_per_second)", "{{job}} reported"),
            ("seresnet:train_images_per_second:5m", "{{job}} from counter (5m)"),
        ], x=0, y=0),
        _timeseries(g, "Images / s per rank", [("seresnet_train_images_per_second", "{{job}} rank {{rank}}")], x=12, y=0),
        _timeseries(g, "Loss", [("avg by (job) (seresnet_train_loss)", "{{job}}")], x=0, y=8),
        _timeseries(g, "Learning rate", [("max by (job) (seresnet_train_learning_rate)", "{{job}}")], x=12, y=8),
        _timeseries(g, "Data-wait time per step (p50 / p90)", [
            ("histogram_quantile(0.5, sum by (le, job) (rate(seresnet_train_data_wait_seconds_bucket[$__rate_interval])))",
             "{{job}} p50"),
            ("histogram_quantile(0.9, sum by (le, job) (rate(seresnet_train_data_wait_seconds_bucket[$__rate_interval])))",
             "{{job}} p90"),
        ], x=0, y=16, unit="s"),
        _timeseries(g, "Share of step time waiting for data", [
            ("sum by (job) (rate(seresnet_train_data_wait_seconds_sum[$__rate_interval])) / "
             "clamp_min(sum by (job) (rate(seresnet_train_step_seconds_sum[$__rate_interval])), 1e-9)", "{{job}}"),
        ], x=12, y=16, unit="percentunit",
            description="Near 1: the input pipeline (DALI/loader) is the bottleneck, not the GPUs."),
        _timeseries(g, "Step time (p50 / p90)", [
            ("histogram_quantile(0.5, sum by (le, job) (rate(seresnet_train_step_seconds_bucket[$__rate_interval])))", "{{job}} p50"),
            ("histogram_quantile(0.9, sum by (le, job) (rate(seresnet_train_step_seconds_bucket[$__rate_interval])))", "{{job}} p90"),
        ], x=0, y=24, unit="s"),
        _timeseries(g, "Steps / s", [("sum by (job) (rate(seresnet_train_steps_total[$__rate_interval]))", "{{job}}")],
                    x=12, y=24, unit="ops"),
        _timeseries(g, "Epoch and validation top-1", [
            ("max by (job) (seresnet_train_epoch)", "{{job}} epoch"),
            ("max by (job) (seresnet_train_val_top1)", "{{job}} val top-1"),
        ], x=0, y=32),
        _timeseries(g, "Device memory per rank", [("seresnet_train_device_memory_bytes", "{{job}} rank {{rank}}")],
                    x=12, y=32, unit="bytes"),
    ]
    return g.Dashboard(title="seresnet / Training", uid="seresnet-training", tags=["seresnet", "training"],
                       timezone="browser", refresh="30s", time=g.Time("now-6h", "now"),
                       templating=_templating(g), panels=panels).auto_panel_ids()


DASHBOARDS = {"seresnet-serving.json": serving_dashboard, "seresnet-training.json": training_dashboard}


def dashboard_json(factory) -> str:
    _, encoder = _dashboard_lib()
    return json.dumps(factory().to_json_data(), cls=encoder, sort_keys=True, indent=2) + "\n"


def prometheus_rule_yaml() -> str:
    """The rule file wrapped as a prometheus-operator PrometheusRule (label `release` left to overlays)."""
    groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    obj = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "seresnet", "labels": {"app.kubernetes.io/part-of": "seresnet-stack"}},
        "spec": {"groups": groups},
    }
    header = "# GENERATED by `python -m launch.monitoring` from rules/seresnet.rules.yaml; edit that file.\n"
    return header + yaml.safe_dump(obj, sort_keys=False, width=200)


def generated_files() -> dict[Path, str]:
    files = {DASHBOARD_DIR / name: dashboard_json(factory) for name, factory in DASHBOARDS.items()}
    files[PROMETHEUS_RULE_FILE] = prometheus_rule_yaml()
    return files


def _walk_exprs(node, out: list[str]) -> None:
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str) and node["expr"].strip():
            out.append(node["expr"])
        for v in node.values():
            _walk_exprs(v, out)
    elif isinstance(node, list):
        for v in node:
            _walk_exprs(v, out)


def dashboard_expressions() -> dict[str, list[str]]:
    """{dashboard file: [expr, ...]} from the committed JSON (what Grafana will run)."""
    found = {}
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        exprs: list[str] = []
        _walk_exprs(json.loads(path.read_text()), exprs)
        found[path.name] = exprs
    return found


def rule_expressions() -> list[dict]:
    """Every rule of the rule file: {'name', 'kind' ('record'|'alert'), 'expr'}."""
    rules = []
    for group in yaml.safe_load(RULES_FILE.read_text())["groups"]:
        for rule in group["rules"]:
            kind = "record" if "record" in rule else "alert"
            rules.append({"name": rule[kind], "kind": kind, "expr": rule["expr"].strip()})
    return rules


def substitute_grafana_variables(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    return expr


def is_gpu_only(expr: str) -> bool:
    return any(m in expr for m in GPU_ONLY_METRICS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.monitoring", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail (exit 1) if the committed files are out of date")
    args = ap.parse_args(argv)
    stale = []
    for path, text in generated_files().items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO_ROOT)}")
    if args.check and stale:
        print("out of date (run `python -m launch.monitoring`): " + ", ".join(str(p.relative_to(REPO_ROOT)) for p in stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
