"""Live: a real Prometheus (127.0.0.1) scrapes a real tritonserver serving the classifier and a real short
training run, evaluates the project's rule file, and every PromQL expression of the dashboards, the alerts
(and their `bool` form), the recording rules and the prometheus-adapter rule is evaluated through
Prometheus's HTTP API: none errors, each returns data, except the GPU-only series (nv_gpu_*), which
Triton does not publish without a GPU and are listed as such."""
from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from scripts import monitoring as m
from tests.conftest import ROOT, SMOKE_CONFIG, free_port, subprocess_env

PROMETHEUS = Path(sys.executable).parent.parent / "tools" / "prometheus" / "usr" / "bin" / "prometheus"
COMPARISON = re.compile(r"^(?P<lhs>.*\S)\s+(?P<op>==|!=|>=|<=|>|<)\s+(?P<rhs>[-+0-9.e]+)\s*$", re.S)
# Every expression proven in the last run, for the report (`pytest -s` prints it).
REPORT: dict = {}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


class Prometheus:
    def __init__(self, workdir: Path, targets: dict[str, str], rules: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [t]}]} for job, t in targets.items()],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.3)
        self.stop()   # a Prometheus that never became ready is not left running
        raise RuntimeError(f"prometheus did not become ready: {(workdir / 'prometheus.log').read_text()[-2000:]}")

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as err:  # 400/422: a bad expression
            return json.loads(err.read())

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr)

    def has_data(self, expr: str) -> bool:
        res = self.query(expr)
        return res.get("status") == "success" and bool(res["data"]["result"])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def fast_rules(tmp: Path) -> Path:
    """The project's rule file with 1 s group intervals (expressions untouched) so a short test sees results."""
    doc = yaml.safe_load(m.RULES_FILE.read_text())
    for g in doc["groups"]:
        g["interval"] = "1s"
    out = tmp / "rules.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def bool_form(expr: str) -> str:
    match = COMPARISON.match(expr.strip())
    assert match, f"alert expression is not `<signal> <op> <number>`: {expr}"
    return f"{match['lhs']} {match['op']} bool {match['rhs']}"


def adapter_query() -> str:
    """The HPA's metric as prometheus-adapter expands its chart values' metricsQuery for one pod (here: job/instance)."""
    (rule,) = yaml.safe_load(m.ADAPTER_VALUES_FILE.read_text())["rules"]["custom"]
    return rule["metricsQuery"].replace("<<.LabelMatchers>>", 'job="triton"').replace("<<.GroupBy>>", "instance")


def wait_for(pred, timeout: float, what: str, poll: float = 1.0, proc=None, log=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited ({proc.returncode}): {log.read_text()[-3000:] if log else ''}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}" + (f": {log.read_text()[-3000:]}" if log else ""))


def finite(result: dict) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in result["data"]["result"])


def test_every_dashboard_and_rule_expression_returns_data_from_live_triton_and_training(tmp_path, tiny_imagefolder):
    if not (ROOT / "train" / "__main__.py").exists():
        pytest.skip("the trainer (train/__main__.py) is not there yet")
    assert PROMETHEUS.is_file(), f"prometheus not found at {PROMETHEUS}; run scripts/setup_env.sh"
    from serve.client import TritonClassifier
    from serve.repository import write_model_repository
    from serve.server import TritonServer
    from scripts.samples import random_checkpoint

    train_port, triton_metrics_port = free_port(), free_port()
    prom = Prometheus(tmp_path, {"triton": f"127.0.0.1:{triton_metrics_port}", "train": f"127.0.0.1:{train_port}"},
                      fast_rules(tmp_path))
    train_log = tmp_path / "train.log"
    trainer = None
    server = None
    stop_traffic = threading.Event()
    try:
        # A real training run, 6 steps an epoch, so validation (val_top1) comes early; it is given more epochs
        # than the test needs (so it still runs while the queries are evaluated) and stopped with SIGTERM.
        with open(train_log, "w") as log:
            trainer = subprocess.Popen(
                [sys.executable, "-m", "train", "--config", str(SMOKE_CONFIG), "--set", f"data.root={tiny_imagefolder}",
                 "--set", f"output_dir={tmp_path / 'run'}", "--set", f"metrics.port={train_port}",
                 "--set", "metrics.address=127.0.0.1", "--set", "train.epochs=30", "--set", "data.batch_size=8",
                 "--set", "train.checkpoint_every_steps=0"],
                cwd=ROOT, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)

        # Triton serving the classifier ensemble (python backend + ONNX Runtime on CPU), latency summaries on.
        ckpt = random_checkpoint(tmp_path / "ckpt")
        repo = write_model_repository(ckpt, tmp_path / "repo", "cpu")
        server = TritonServer(repo, metrics_port=triton_metrics_port, ready_timeout=300,
                              extra_args=["--metrics-config=summary_latencies=true", "--metrics-interval-ms=1000"]).start()
        images = [p.read_bytes() for p in sorted((tiny_imagefolder / "test").rglob("*.png"))]
        client = TritonClassifier(server.grpc_url, protocol="grpc")
        results = [client.classify_bytes(img) for img in images[:12]]
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        # rate() needs the counter seen at 0 before it rises: a rejection that lands before Prometheus first scrapes
        # this server starts its series at 1 and rate() reads 0 for the whole window (the CI failure of stop 13).
        wait_for(lambda: prom.has_data('seresnet_preprocess_rejected_total{reason="decode"} == 0'), 120,
                 "Prometheus's first scrape of the rejection counter at 0")
        bad = TritonClassifier(server.grpc_url, protocol="grpc", max_attempts=1).classify_bytes(b"not an image")
        assert not bad.ok  # one failed request: the error panels and the error-ratio rule see a real failure

        def traffic():  # keep latency summaries fresh while queries run; bounded in count and time
            t_end = time.time() + 240
            for i in range(2000):
                if stop_traffic.is_set() or time.time() > t_end:
                    return
                client.classify_bytes(images[i % len(images)])
                time.sleep(0.2)

        threading.Thread(target=traffic, daemon=True).start()

        def all_present(*exprs):
            missing = [e for e in exprs if not prom.has_data(e)]
            all_present.missing = missing
            return not missing

        wait_for(lambda: all_present("seresnet_train_val_top1", "seresnet:train_images_per_second:5m",
                                     "rate(seresnet_train_steps_total[1m]) > 0"),
                 420, "the trainer's metrics after its first validation", proc=trainer, log=train_log)
        try:
            wait_for(lambda: all_present('nv_inference_request_summary_us{quantile="0.99",model="classify"} >= 0',
                                         "seresnet:prediction_confidence_mean:30m >= 0",
                                         "sum(nv_inference_request_failure) > 0"), 60, "Triton metrics in Prometheus")
        except AssertionError as err:
            raise AssertionError(f"{err}; missing: {all_present.missing}; scraped: "
                                 f"{sorted(prom.api('label/__name__/values')['data'])}") from None
        assert trainer.poll() is None, "the trainer must still run while its queries are evaluated"
        # The one undecodable image is a client rejection: the client ratio sees it, the paging server ratio stays 0.
        wait_for(lambda: prom.has_data("seresnet:triton_client_error_ratio:5m > 0"), 60,
                 "the rejected image in seresnet:triton_client_error_ratio:5m (seresnet_preprocess_rejected_total)")
        # Triton 2.51 counts the failed ensemble request twice on the ensemble itself (reason OTHER), none on the
        # composing model that answered with the error; the rules halve it. If an upgrade changes that, this fails
        # before the alerts go wrong.
        failures = prom.query('sum(nv_inference_request_failure{model="classify",reason="OTHER"})')["data"]["result"]
        composing = prom.query(f'sum(nv_inference_request_failure{{{m.COMPOSING}}})')["data"]["result"]
        rejected = prom.query("sum(seresnet_preprocess_rejected_total)")["data"]["result"]
        assert [float(r["value"][1]) for r in failures] == [2.0] and [float(r["value"][1]) for r in rejected] == [1.0], \
            (failures, rejected)
        assert [float(r["value"][1]) for r in composing] == [0.0], composing
        # Nothing was shed: the shed ratio exists per composing model (Triton exports reason="REJECTED" at 0) and is 0.
        shed = prom.query("seresnet:triton_shed_ratio:5m")["data"]["result"]
        assert shed and all(float(s["value"][1]) == 0.0 for s in shed), shed
        server_ratio = [float(s["value"][1]) for s in prom.query("seresnet:triton_error_ratio:5m")["data"]["result"]]
        assert server_ratio == [0.0], f"a bad client image counted as a server error: {server_ratio}"

        proven, evaluated_only, gpu_only, failures = {}, {}, [], []

        def prove(label: str, expr: str, need_data: bool = True):
            res = prom.query(m.substitute_grafana_variables(expr))
            if res.get("status") != "success":
                failures.append(f"{label}: {expr}: {res.get('errorType')}: {res.get('error')}")
                return
            if m.is_gpu_only(expr):
                gpu_only.append(expr)
                return
            if not need_data:
                evaluated_only[expr] = label
                return
            if not (res["data"]["result"] and finite(res)):
                failures.append(f"{label}: no (finite) data: {expr}")
                return
            proven[expr] = label

        for dashboard, exprs in m.dashboard_expressions().items():
            for e in exprs:
                prove(dashboard, e)
        for rule in m.rule_expressions():
            if rule["kind"] == "record":
                prove(f"record {rule['name']}", rule["expr"])
                prove(f"recorded series {rule['name']}", rule["name"])
            else:
                prove(f"alert {rule['name']}", rule["expr"], need_data=False)   # fires only when it should
                prove(f"alert {rule['name']} (bool)", bool_form(rule["expr"]))
        prove("prometheus-adapter metricsQuery", adapter_query())
        # The HPA and the queue alert cover every composing model this server actually runs (the ensemble aside).
        live = {s["metric"]["model"] for s in prom.query("group by (model) (nv_inference_queue_duration_us)")["data"]["result"]}
        assert m.ENSEMBLE in live and live - {m.ENSEMBLE} and live - {m.ENSEMBLE} <= set(m.COMPOSING_MODELS), live

        # Prometheus itself evaluated every rule of the file without error.
        groups = prom.api("rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == len(m.rule_expressions())
        bad_rules = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        assert not bad_rules, bad_rules
        # The GPU-only list is exactly the nv_gpu_* panels; everything else was proven.
        assert gpu_only and all("nv_gpu_" in e for e in gpu_only)
        assert not failures, "\n".join(failures)
        REPORT.update(proven=proven, evaluated_only=evaluated_only, gpu_only=gpu_only)
        print(f"\nreturned data live: {len(proven)} expressions; alert conditions evaluated without error: "
              f"{len(evaluated_only)} (their bool forms returned data); GPU-only (no data on CPU): {len(gpu_only)}")
        for e, label in proven.items():
            print(f"  [{label}] {' '.join(e.split())}")
        for e, label in evaluated_only.items():
            print(f"  [{label}: evaluated, no error; silent as it should be] {' '.join(e.split())}")
        for e in gpu_only:
            print(f"  [GPU-only, evaluated without error, no data on CPU] {e}")
    finally:
        stop_traffic.set()
        if trainer is not None and trainer.poll() is None:
            trainer.send_signal(signal.SIGTERM)
            try:
                trainer.wait(30)
            except subprocess.TimeoutExpired:
                trainer.kill()
        if server is not None:
            server.stop()
        prom.stop()
