"""The plan-building init container (k8s/serving/base/build-plans.sh) run for real by /bin/sh against a fake
nvidia-smi and a fake trtexec (a script that builds slowly, fails, writes a truncated plan, or caps the profile
below the config's max batch, and whose --loadEngine refuses a batch the plan does not cover): profile from
config.pbtxt, one build for several concurrent pods on one cache, checksummed cache entries, the max-batch check
before the swap, the failure policy, and the rendered recipe identical to serve/tensorrt.py's."""
from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve import tensorrt as trt_recipe
from serve.contract import CLASSIFIER, INPUT_NAME, plan_filename
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "k8s" / "serving" / "base" / "build-plans.sh"

FAKE_NVIDIA_SMI = """#!/bin/sh
case "$*" in
  *name,compute_cap*) echo "NVIDIA H100 80GB HBM3, 9.0";;
  *compute_cap*) echo "9.0";;
  *) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)";;
esac
"""
# A plan is "PLAN max=<batch> ... END"; --loadEngine fails on a truncated plan or a batch above max.
FAKE_TRTEXEC = r"""#!/bin/sh
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v${FAKE_TRT_VERSION:-100500}] # trtexec $*"
out=""; max=""; load=""; shapes=""
for a in "$@"; do case "$a" in
  --saveEngine=*) out=${a#--saveEngine=};;
  --maxShapes=*) max=${a#*:}; max=${max%%x*};;
  --loadEngine=*) load=${a#--loadEngine=};;
  --shapes=*) shapes=${a#*:}; shapes=${shapes%%x*};;
esac; done
[ "$1" = "--help" ] && exit 0
if [ -n "$load" ]; then
  echo "load $*" >> "$TRTEXEC_CALLS"
  tail -c 3 "$load" | grep -q END || { echo "[E] Error: engine deserialization failed"; exit 1; }
  pmax=$(sed -n 's/^PLAN max=\([0-9]*\).*/\1/p' "$load")
  [ "$shapes" -le "$pmax" ] || { echo "[E] Error: batch $shapes exceeds the profile max $pmax"; exit 1; }
  exit 0
fi
echo "build $*" >> "$TRTEXEC_CALLS"
[ -n "${FAKE_TRTEXEC_CAP:-}" ] && [ "$max" -gt "$FAKE_TRTEXEC_CAP" ] && max=$FAKE_TRTEXEC_CAP
case "${FAKE_TRTEXEC_MODE:-ok}" in
  fail) echo "[E] Error: parsing failed"; exit 1;;
  truncate) printf 'PLAN max=%s half-written' "$max" > "$out"; exit 0;;
  slow) printf 'PLAN max=%s ' "$max" > "$out"; sleep "${FAKE_TRTEXEC_SLEEP:-2}";;
esac
printf 'PLAN max=%s payload END' "$max" >> "$out"
"""
CONFIG = """name: "se_resnet50"
platform: "onnxruntime_onnx"
max_batch_size: 64
input {
  name: "input"
  data_type: TYPE_FP32
  dims: 3
  dims: 32
  dims: 32
}
output {
  name: "probabilities"
  data_type: TYPE_FP32
  dims: 10
}
default_model_filename: "model.onnx"
dynamic_batching {
  preferred_batch_size: 16
  preferred_batch_size: 32
  preferred_batch_size: 64
  max_queue_delay_microseconds: 500
}
"""


def _exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture()
def plans(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _exe(bin_dir / "nvidia-smi", FAKE_NVIDIA_SMI)
    _exe(bin_dir / "trtexec", FAKE_TRTEXEC)
    src = tmp_path / "models"
    (src / CLASSIFIER / "1").mkdir(parents=True)
    (src / CLASSIFIER / "1" / "model.onnx").write_bytes(b"onnx-bytes")
    (src / CLASSIFIER / "1" / "model.fp16.onnx").write_bytes(b"fp16-onnx-bytes")
    (src / CLASSIFIER / "config.pbtxt").write_text(CONFIG)
    (src / "preprocess" / "1").mkdir(parents=True)
    (src / "preprocess" / "1" / "model.py").write_text("# python model\n")
    calls = tmp_path / "calls.txt"
    calls.touch()
    counter = iter(range(1000))

    def env(**extra):
        n = next(counter)
        dst = tmp_path / f"repo-{n}"
        dst.mkdir()
        e = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SRC_REPOSITORY": str(src), "DST_REPOSITORY": str(dst),
             "PLAN_WORK": str(tmp_path / f"work-{n}"),
             "PLAN_CACHE": str(tmp_path / "cache"), "PLAN_MODELS": CLASSIFIER, "TRTEXEC_CALLS": str(calls),
             "PLAN_TERMINATION_LOG": str(tmp_path / f"termination-{n}.log"), "PLAN_FAILURE_POLICY": "fallback",
             "HOSTNAME": f"pod-{n}"}
        e.update({k: str(v) for k, v in extra.items()})
        return e, dst

    def run(e, timeout=60):
        return subprocess.run(["/bin/sh", str(SCRIPT)], env=e, capture_output=True, text=True, timeout=timeout)

    def builds():
        return [line for line in calls.read_text().splitlines() if line.startswith("build ")]

    return type("Plans", (), {"env": staticmethod(env), "run": staticmethod(run), "builds": staticmethod(builds),
                              "cache": tmp_path / "cache", "tmp": tmp_path, "calls": calls})


def _served(dst: Path) -> dict:
    d = dst / CLASSIFIER
    return {"plan": (d / "1" / plan_filename("9.0")).exists(), "onnx": (d / "1" / "model.onnx").exists(),
            "config": (d / "config.pbtxt").read_text(), "status": json.loads((dst / "plan-status.json").read_text())}


def test_rendered_block_is_the_package_recipe():
    r = subprocess.run([sys.executable, "-m", "serve.tensorrt", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert trt_recipe.rendered_block() in SCRIPT.read_text()
    assert trt_recipe.init_container_script() == SCRIPT.read_text()
    # A hand edit of the block is caught.
    edited = SCRIPT.read_text().replace('"--warmUp=0"', '"--warmUp=10"')
    assert trt_recipe.script_with_block(edited) != edited


def test_profile_and_argv_come_from_the_config_and_match_python(plans):
    e, dst = plans.env()
    r = plans.run(e)
    assert r.returncode == 0, r.stdout + r.stderr
    (build,) = plans.builds()
    mn, opt, mx = trt_recipe.plan_profile(64, [16, 32, 64])
    assert (mn, opt, mx) == (1, 64, 64)
    argv = shlex.split(build)[1:]
    tmp_plan = next(a.split("=", 1)[1] for a in argv if a.startswith("--saveEngine="))
    onnx = str(dst / CLASSIFIER / "1" / "model.fp16.onnx")    # TensorRT 11: fp16 from the fp16-typed ONNX, no flag
    assert argv == trt_recipe.trtexec_command(onnx, tmp_plan, "fp16", mn, opt, mx, 32)[1:]
    assert not any(a in argv for a in ("--fp16", "--int8", "--best"))
    load = [line for line in plans.calls.read_text().splitlines() if line.startswith("load ")]
    assert load and f"--shapes={INPUT_NAME}:64x3x32x32" in load[0]
    s = _served(dst)
    assert s["plan"] and not s["onnx"] and not (dst / CLASSIFIER / "1" / "model.fp16.onnx").exists()
    assert s["status"]["cache_errors"] == 0 and not (plans.tmp / "work-0").exists()
    assert 'platform: "tensorrt_plan"' in s["config"] and f'default_model_filename: "{plan_filename("9.0")}"' in s["config"]
    assert "model.onnx" not in s["config"] and s["status"]["models"][CLASSIFIER]["backend"] == "tensorrt_plan"
    assert (dst / "preprocess" / "1" / "model.py").exists()
    # Profile rule: the largest preferred size that fits, else max.
    assert trt_recipe.plan_profile(64, [8, 16]) == (1, 16, 64) and trt_recipe.plan_profile(8, [16]) == (1, 8, 8)
    out = subprocess.run(["/bin/sh", "-c", f'{trt_recipe.rendered_block()}\nplan_profile 64 8 16; plan_profile 8 16; plan_file 10.0'],
                         capture_output=True, text=True).stdout.split("\n")
    assert out[:3] == ["1 16 64", "1 8 8", plan_filename("10.0")]


def test_list_style_config_without_preferred_sizes(plans):
    """config.pbtxt in the other text-format style (input [ { dims: [ ... ] } ], backend:) and no preferred sizes."""
    cfg = plans.tmp / "models" / CLASSIFIER / "config.pbtxt"
    cfg.write_text('name: "se_resnet50"\nbackend: "onnxruntime"\nmax_batch_size: 16\n'
                   'input [\n  {\n    name: "x"\n    data_type: TYPE_FP32\n    dims: [ 3, 64, 64 ]\n  }\n]\n')
    e, dst = plans.env()
    r = plans.run(e)
    assert r.returncode == 0, r.stdout + r.stderr
    (build,) = plans.builds()
    assert "--optShapes=x:16x3x64x64" in build and "--maxShapes=x:16x3x64x64" in build and "--minShapes=x:1x3x64x64" in build
    text = (dst / CLASSIFIER / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in text and "onnxruntime" not in text


def test_concurrent_pods_build_once_and_never_cache_a_truncated_plan(plans):
    runs = [plans.env(FAKE_TRTEXEC_MODE="slow", FAKE_TRTEXEC_SLEEP=2) for _ in range(4)]
    procs = [subprocess.Popen(["/bin/sh", str(SCRIPT)], env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for e, _ in runs]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len(plans.builds()) == 1, outs
    assert sum("waiting" in o for o in outs) >= 1
    plans_cached = list(plans.cache.rglob("*.plan"))
    assert len(plans_cached) == 1 and not [p for p in plans.cache.rglob("*") if ".tmp." in p.name or p.name.endswith(".lock")]
    body = plans_cached[0].read_bytes()
    assert body.endswith(b"END") and Path(str(plans_cached[0]) + ".sha256").read_text().strip()
    for _, dst in runs:
        assert (dst / CLASSIFIER / "1" / plan_filename("9.0")).read_bytes() == body

    # A truncated cache entry (checksum mismatch) is rebuilt, not served.
    plans_cached[0].write_bytes(body[:10])
    e, dst = plans.env()
    r = plans.run(e)
    assert r.returncode == 0 and "does not match its sha256" in r.stdout, r.stdout
    assert len(plans.builds()) == 2 and (dst / CLASSIFIER / "1" / plan_filename("9.0")).read_bytes().endswith(b"END")


def test_truncated_or_failed_builds_are_refused_and_never_cached(plans):
    for mode, why in (("truncate", "does not load and run at max batch"), ("fail", "trtexec failed")):
        e, dst = plans.env(FAKE_TRTEXEC_MODE=mode)
        r = plans.run(e)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"PLAN BUILD FAILED for {CLASSIFIER}" in r.stdout and why in r.stdout
        s = _served(dst)
        assert s["onnx"] and not s["plan"] and 'platform: "onnxruntime_onnx"' in s["config"]
        assert s["status"]["models"][CLASSIFIER]["backend"] == "onnx-fallback"
        assert not list(plans.cache.rglob("*.plan*")) and not list(plans.cache.rglob(".tmp.*"))


def test_int8_without_qdq_nodes_is_not_built(plans):
    e, dst = plans.env(PLAN_PRECISION="int8")
    r = plans.run(e)
    assert "has no DequantizeLinear nodes" in r.stdout and not plans.builds() and _served(dst)["onnx"]


def test_a_plan_below_the_config_max_batch_is_refused_before_the_swap(plans):
    e, dst = plans.env(FAKE_TRTEXEC_CAP=32)          # the engine ends up with max batch 32, config says 64
    r = plans.run(e)
    assert "does not load and run at max batch 64" in r.stdout and "batch 64 exceeds the profile max 32" in r.stdout
    s = _served(dst)
    assert s["onnx"] and not s["plan"] and not list(plans.cache.rglob("*.plan"))


def test_failure_policy_fail_stops_the_pod_with_a_termination_message(plans):
    e, dst = plans.env(FAKE_TRTEXEC_MODE="fail", PLAN_FAILURE_POLICY="fail")
    r = plans.run(e)
    assert r.returncode == 1 and "PLAN_FAILURE_POLICY=fail" in r.stdout
    msg = Path(e["PLAN_TERMINATION_LOG"]).read_text()
    assert msg.startswith("plans: ") and f"{CLASSIFIER}=failed (trtexec failed" in msg
    assert _served(dst)["status"]["models"][CLASSIFIER]["backend"] == "failed"
    # A wrong TensorRT (plans the server cannot load) and no GPU are failures too.
    e, _ = plans.env(PLAN_FAILURE_POLICY="fail", PLAN_TENSORRT_VERSION="100900")
    r = plans.run(e)
    assert r.returncode == 1 and "trtexec is TensorRT v100500 but the server loads v100900 plans only" in r.stdout
    e, dst = plans.env(PLAN_FAILURE_POLICY="fallback")
    e["PATH"] = "/usr/bin:/bin"
    r = plans.run(e)
    assert r.returncode == 0 and "no GPU visible" in r.stdout and _served(dst)["onnx"]
    e, _ = plans.env(PLAN_FAILURE_POLICY="maybe")
    r = plans.run(e)
    assert r.returncode == 2 and "PLAN_FAILURE_POLICY='maybe' is not fail or fallback" in r.stdout


def test_a_stale_lock_is_broken_and_a_live_one_waited_for(plans):
    e, dst = plans.env(PLAN_LOCK_STALE_S=3)
    r = plans.run(e)          # builds once to learn the cache entry name
    entry = next(plans.cache.rglob("*.plan"))
    os.remove(entry)
    lock = Path(str(entry) + ".lock")
    lock.mkdir()
    (lock / "owner").write_text("pod-dead pid 1")
    old = time.time() - 60
    os.utime(lock, (old, old))
    e, dst = plans.env(PLAN_LOCK_STALE_S=3)
    r = plans.run(e)
    assert r.returncode == 0 and "pod-dead pid 1' has had no heartbeat" in r.stdout, r.stdout
    assert _served(dst)["plan"] and not lock.exists()
    # A build longer than the stale limit keeps its lock alive with a heartbeat: the waiter does not break it.
    os.remove(entry)
    runs = [plans.env(PLAN_LOCK_STALE_S=2, FAKE_TRTEXEC_MODE="slow", FAKE_TRTEXEC_SLEEP=5) for _ in range(2)]
    builds_before = len(plans.builds())
    procs = [subprocess.Popen(["/bin/sh", str(SCRIPT)], env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for e, _ in runs]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert len(plans.builds()) == builds_before + 1 and not any("breaking it" in o for o in outs), outs
    # A fresh lock whose owner never finishes: the waiter gives up after PLAN_LOCK_WAIT_S (policy decides).
    os.remove(entry)
    lock.mkdir()
    e, dst = plans.env(PLAN_LOCK_STALE_S=600, PLAN_LOCK_WAIT_S=2)
    r = plans.run(e)
    assert "is building this plan; waiting" in r.stdout and "waited 2 s for another pod's build" in r.stdout
    assert _served(dst)["onnx"]


def test_int8_needs_a_qdq_onnx_and_no_calibration(tmp_path):
    onnx = require("onnx")
    from onnx import TensorProto, helper

    def model(ops):
        nodes = [helper.make_node(op, ["input"] + (["s", "z"] if "Linear" in op else []), ["probabilities"]) for op in ops]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 32, 32])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", 3, 32, 32])])
        return helper.make_model(g)

    plain, qdq = tmp_path / "plain.onnx", tmp_path / "qdq.onnx"
    onnx.save(model(["Relu"]), plain)
    onnx.save(model(["QuantizeLinear"]), qdq)
    from serve.errors import ServeError
    with pytest.raises(ServeError, match="no QuantizeLinear/DequantizeLinear nodes"):
        trt_recipe.trtexec_command(plain, "p.plan", "int8", 1, 8, 32)
    with pytest.raises(ServeError, match="removed in 11"):
        trt_recipe.trtexec_command(qdq, "p.plan", "int8", 1, 8, 32, calib_cache="c.cache")
    for precision in ("fp16", "fp32"):   # a Q/DQ ONNX is int8 whatever the flag would say
        with pytest.raises(ServeError, match="carries Q/DQ nodes: it builds as int8 only"):
            trt_recipe.trtexec_command(qdq, "p.plan", precision, 1, 8, 32)
    cmd = trt_recipe.trtexec_command(qdq, "p.plan", "int8", 1, 8, 32)
    assert not any(c.startswith("--calib") for c in cmd) and "--maxShapes=input:32x3x32x32" in cmd
    assert ("--int8" in cmd) == (not trt_recipe.STRONGLY_TYPED)


def test_fp16_plans_come_from_an_fp16_typed_onnx(tmp_path):
    """TensorRT 11 has no --fp16: the fp16 plan is built from the fp16-typed copy (weights fp16, input/output
    still fp32, the same answers as the fp32 model within fp16 rounding under ONNX Runtime)."""
    onnx = require("onnx")
    ort = require("onnxruntime")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.2, (4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Softmax", ["f"], ["probabilities"], axis=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 16, 16])],
                          [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", 4])], [w])
    src = tmp_path / "model.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), src)
    from serve.errors import ServeError
    if trt_recipe.STRONGLY_TYPED:
        with pytest.raises(ServeError, match="is an fp32 ONNX and TensorRT .* builds the types the ONNX has"):
            trt_recipe.trtexec_command(src, "p.plan", "fp16", 1, 8, 32)
    assert trt_recipe.plan_source(src, "fp16", tmp_path / "out") == tmp_path / "out" / "model.fp16.onnx"
    r = subprocess.run([sys.executable, "-m", "serve.tensorrt", "--fp16-onnx", str(src), str(tmp_path / "out" / "model.fp16.onnx")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    half = tmp_path / "out" / "model.fp16.onnx"
    assert trt_recipe.onnx_is_fp16(half) and not trt_recipe.onnx_is_fp16(src)
    assert trt_recipe.plan_source(half, "fp16", tmp_path / "x") == half
    cmd = trt_recipe.trtexec_command(half, "p.plan", "fp16", 1, 8, 32)
    assert cmd[1] == f"--onnx={half}" and "--fp16" not in cmd[1:] or not trt_recipe.STRONGLY_TYPED
    m = onnx.load(str(half))
    assert [i.type.tensor_type.elem_type for i in m.graph.input] == [TensorProto.FLOAT]     # the config is unchanged
    assert [o.type.tensor_type.elem_type for o in m.graph.output] == [TensorProto.FLOAT]
    x = rng.normal(0, 1, (2, 3, 16, 16)).astype(np.float32)
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(run(half), run(src), atol=2e-3)


def _qdq_repository(plans, precision_param: str | None):
    d = plans.tmp / "models" / CLASSIFIER
    (d / "1" / "model.onnx").write_bytes(b"onnx QuantizeLinear DequantizeLinear bytes")
    (d / "1" / "model.fp16.onnx").unlink()
    if precision_param:
        (d / "config.pbtxt").write_text(CONFIG + f'parameters {{\n  key: "PRECISION"\n  value {{\n    string_value: "{precision_param}"\n  }}\n}}\n')


def test_an_int8_repository_builds_int8_from_its_qdq_onnx(plans):
    _qdq_repository(plans, "int8")
    e, dst = plans.env()                       # PLAN_PRECISION=auto: the deployment's default
    r = plans.run(e)
    assert r.returncode == 0, r.stdout + r.stderr
    (build,) = plans.builds()
    assert f"--onnx={dst / CLASSIFIER / '1' / 'model.onnx'}" in build and not any(f in build for f in (" --fp16", " --int8"))
    s = _served(dst)
    assert s["plan"] and s["status"]["models"][CLASSIFIER]["detail"].strip().endswith("int8")
    assert list(plans.cache.rglob("*-int8-b1-64-64.plan"))
    # Forcing fp16 onto a Q/DQ model is refused before any build.
    e, dst = plans.env(PLAN_PRECISION="fp16")
    r = plans.run(e)
    assert "no " in r.stdout and "for a fp16 plan" in r.stdout and len(plans.builds()) == 1
    (plans.tmp / "models" / CLASSIFIER / "1" / "model.fp16.onnx").write_bytes(b"fp16")
    e, dst = plans.env(PLAN_PRECISION="fp16")
    r = plans.run(e)
    assert "carries Q/DQ nodes: it builds as int8 only" in r.stdout and len(plans.builds()) == 1 and _served(dst)["onnx"]


def test_a_gpu_below_the_pinned_minimum_is_refused(plans):
    smi = plans.tmp / "bin" / "nvidia-smi"
    smi.write_text(FAKE_NVIDIA_SMI.replace("NVIDIA H100 80GB HBM3, 9.0", "Tesla V100-SXM2-32GB, 7.0").replace('echo "9.0"', 'echo "7.0"'))
    e, dst = plans.env(PLAN_FAILURE_POLICY="fail")
    r = plans.run(e)
    assert r.returncode == 1 and not plans.builds()
    assert f"compute capability 7.0 is below {trt_recipe.MIN_CC}, the minimum of the pinned Triton" in r.stdout


FAILING_CP = """#!/bin/sh
# cp that fails like a full or root-squashed cache volume: on any path under CP_FAIL_UNDER
for a in "$@"; do case "$a" in "$CP_FAIL_UNDER"*) echo "cp: $a: No space left on device" >&2; exit 1;; esac; done
exec /bin/cp "$@"
"""


def test_the_plan_cache_is_optional(plans):
    """Any cache fault (no cache volume, a cache that cannot be written or read back) is logged and counted, and the
    plan built in the pod is served, under the fail policy too."""
    blocked = plans.tmp / "not-a-dir"
    blocked.write_text("a file where the cache volume should be")
    e, dst = plans.env(PLAN_CACHE=blocked / "cache", PLAN_FAILURE_POLICY="fail")
    r = plans.run(e)
    assert r.returncode == 0, r.stdout + r.stderr
    s = _served(dst)
    assert s["plan"] and s["status"]["cache_errors"] == 1 and "PLAN CACHE ERROR (1): cannot write" in r.stdout
    assert "plan cache errors: 1" in Path(e["PLAN_TERMINATION_LOG"]).read_text()
    # Full disk while publishing: the plan is still served, the cache keeps no half entry.
    _exe(plans.tmp / "bin" / "cp", FAILING_CP)
    e, dst = plans.env(CP_FAIL_UNDER=plans.cache, PLAN_FAILURE_POLICY="fail")
    r = plans.run(e)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _served(dst)["plan"] and _served(dst)["status"]["cache_errors"] == 1 and "could not write" in r.stdout
    assert not list(plans.cache.rglob("*.plan")) and not list(plans.cache.rglob(".tmp.*"))
    # A good entry that cannot be read back: built here instead.
    (plans.tmp / "bin" / "cp").unlink()
    e, _ = plans.env()
    assert plans.run(e).returncode == 0 and list(plans.cache.rglob("*.plan"))
    builds = len(plans.builds())
    _exe(plans.tmp / "bin" / "cp", FAILING_CP)
    e, dst = plans.env(CP_FAIL_UNDER=plans.cache)
    r = plans.run(e)
    assert r.returncode == 0 and "cannot read" in r.stdout and len(plans.builds()) == builds + 1
    assert _served(dst)["plan"] and _served(dst)["status"]["cache_errors"] == 1


# ---------------------------------------------------------------- scripts/gpu_serving_check.sh (CPU-safe parts)

GPU_CHECK = ROOT / "scripts" / "gpu_serving_check.sh"
TRTEXEC_LOG = """[11/29/2026-05:00:00] [I] === Performance summary ===
[11/29/2026-05:00:00] [I] Throughput: 1523.41 qps
[11/29/2026-05:00:00] [I] Latency: min = 0.61 ms, max = 1.9 ms, mean = 0.65 ms, median = 0.64 ms, percentile(90%) = 0.67 ms, percentile(95%) = 0.69 ms, percentile(99%) = 0.83 ms
[11/29/2026-05:00:00] [I] GPU Compute Time: min = 0.6 ms, max = 1.8 ms, mean = 0.63 ms, median = 0.62 ms, percentile(90%) = 0.65 ms, percentile(95%) = 0.66 ms, percentile(99%) = 0.8 ms
"""


def test_gpu_check_script_dry_run_renders_the_recipe(tmp_path):
    onnx = require("onnx")
    from onnx import TensorProto, helper

    def save(path, op):
        node = helper.make_node(op, ["input"] + (["s"] if op == "QuantizeLinear" else []), ["probabilities"])
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 32, 32])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", 3, 32, 32])])
        onnx.save(helper.make_model(g), path)

    save(tmp_path / "model.onnx", "Relu")
    save(tmp_path / "model.int8.onnx", "QuantizeLinear")
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)]).returncode == 0
    env = dict(os.environ, PYTHON=sys.executable, PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin")
    r = subprocess.run(["bash", str(GPU_CHECK), "--onnx", str(tmp_path / "model.onnx"), "--out", str(tmp_path / "out"),
                        "--batches", "1 8 16", "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    cmds = [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith("+ ")]
    out = tmp_path / "out"
    assert [sys.executable, "-m", "serve.tensorrt", "--fp16-onnx", str(tmp_path / "model.onnx"), str(out / "model.fp16.onnx")] in cmds
    fp16 = trt_recipe.trtexec_command(out / "model.fp16.onnx", out / "model.fp16.plan", "fp16", 1, 16, 16, image_size=32)
    int8 = trt_recipe.trtexec_command(tmp_path / "model.int8.onnx", out / "model.int8.plan", "int8", 1, 16, 16)
    assert fp16 in cmds and int8 in cmds
    assert trt_recipe.verify_command(out / "model.int8.plan", 16, "3x32x32") in cmds
    compare = [c for c in cmds if c[:2] == ["polygraphy", "run"] and "--trt" in c]
    assert len(compare) == 2 and all("--load-outputs" in c and "--atol" in c for c in compare)
    timing = [c for c in cmds if any(a.startswith("--shapes=") for a in c) and "--duration=10" in c]
    assert sorted(a for c in timing for a in c if a.startswith("--shapes=")) == sorted(
        [f"--shapes=input:{b}x3x32x32" for b in (1, 8, 16)] * 2)
    # Mistakes end in one sentence and exit 2.
    for args, msg in ((["--bogus"], "unknown argument '--bogus'"), (["--onnx", str(tmp_path / "nope.onnx")], "does not exist"),
                      (["--onnx", str(tmp_path / "model.onnx"), "--batches", "0 8"], "--batches must be positive integers")):
        r = subprocess.run(["bash", str(GPU_CHECK), *args, "--dry-run"], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_trtexec_performance_summary_is_parsed(tmp_path):
    perf = trt_recipe.parse_trtexec_perf(TRTEXEC_LOG)
    assert perf["throughput_qps"] == 1523.41 and perf["latency_ms"]["p99"] == 0.83 and perf["gpu_compute_ms"]["median"] == 0.62
    from serve.errors import ServeError
    with pytest.raises(ServeError, match="no performance summary"):
        trt_recipe.parse_trtexec_perf("[E] Error: engine deserialization failed")


# ---------------------------------------------------------------- one profile rule: `serve trt` and `repository --plan`

def test_serve_trt_and_repository_plan_follow_the_one_profile_rule(tmp_path):
    """`serve trt` takes the profile from the export's serving spec (what config.pbtxt will say), not a default of
    its own; `serve repository --plan` refuses a plan built with another profile, TensorRT or GPU."""
    onnx = require("onnx")
    from onnx import TensorProto, helper

    from serve.errors import ServeError

    g = helper.make_graph([helper.make_node("Relu", ["input"], ["probabilities"])], "g",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 32, 32])],
                          [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", 3, 32, 32])])
    export = tmp_path / "export"
    export.mkdir()
    onnx.save(helper.make_model(g), export / "model.onnx")
    with pytest.raises(ServeError, match="no serving_spec.json beside"):
        trt_recipe.profile_for_onnx(export / "model.onnx")
    (export / "serving_spec.json").write_text(json.dumps({"serve": {"max_batch_size": 64, "preferred_batch_sizes": [16, 32]}}))
    assert trt_recipe.profile_for_onnx(export / "model.onnx") == (1, 32, 64)
    r = subprocess.run([sys.executable, "-m", "serve", "trt", "--onnx", str(export / "model.onnx"), "--out", str(tmp_path / "p"),
                        "--precision", "fp32", "--print-only"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "--optShapes=input:32x3x32x32" in r.stdout and "--maxShapes=input:64x3x32x32" in r.stdout

    plan = tmp_path / "model.sm90.plan"
    plan.write_bytes(b"engine")
    with pytest.raises(ServeError, match="has no model.sm90.plan.json beside it"):
        trt_recipe.check_plan(plan, None, 64, [16, 32])
    meta = {"compute_capability": "9.0", "precision": "fp16", "tensorrt": trt_recipe.ROW["tensorrt"], "profile": [1, 32, 32]}
    Path(f"{plan}.json").write_text(json.dumps(meta))
    with pytest.raises(ServeError, match=r"has profile min/opt/max \[1, 32, 32\] but this repository needs \[1, 32, 64\]"):
        trt_recipe.check_plan(plan, None, 64, [16, 32])
    Path(f"{plan}.json").write_text(json.dumps({**meta, "profile": [1, 32, 64], "tensorrt": "10.5.0"}))
    with pytest.raises(ServeError, match="was built by TensorRT 10.5.0 but Triton"):
        trt_recipe.check_plan(plan, None, 64, [16, 32])
    Path(f"{plan}.json").write_text(json.dumps({**meta, "profile": [1, 32, 64]}))
    with pytest.raises(ServeError, match="--plan-cc 8.0 but"):
        trt_recipe.check_plan(plan, "8.0", 64, [16, 32])
    assert trt_recipe.check_plan(plan, None, 64, [16, 32]) == "9.0"
    Path(f"{plan}.json").write_text(json.dumps({**meta, "profile": [1, 32, 64], "compute_capability": "7.0"}))
    with pytest.raises(ServeError, match=r"compute capability 7\.0 \(V100\) is below"):
        trt_recipe.check_plan(plan, None, 64, [16, 32])


def test_repository_plan_is_checked_before_it_is_copied(tmp_path):
    """`serve repository --target tensorrt --plan`: a plan with another profile is refused; the right one lands under
    its GPU's name beside the fp16-typed ONNX the init container would build from."""
    onnx = require("onnx")
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    from serve.errors import ServeError
    from serve.repository import write_model_repository
    from train.config import ServeConfig

    export = tmp_path / "export"
    export.mkdir()
    w = numpy_helper.from_array(np.full((3, 3, 1, 1), 0.5, np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["input", "w"], ["c"]), helper.make_node("GlobalAveragePool", ["c"], ["p"]),
                           helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Softmax", ["f"], ["probabilities"], axis=1)],
                          "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 32, 32])],
                          [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", 3])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), export / "model.onnx")
    serve = ServeConfig().model_dump()
    (export / "serving_spec.json").write_text(json.dumps({
        "eval": {"image_size": 32, "eval_resize": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                 "reducing_gap": 3.0}, "serve": serve, "classes": ["a", "b", "c"]}))
    (export / "labels.txt").write_text("a\nb\nc\n")
    plan = tmp_path / "model.sm90.plan"
    plan.write_bytes(b"engine")
    want = list(trt_recipe.plan_profile(serve["max_batch_size"], serve["preferred_batch_sizes"]))
    meta = {"compute_capability": "9.0", "precision": "fp16", "tensorrt": trt_recipe.ROW["tensorrt"], "profile": [1, 1, 1]}
    Path(f"{plan}.json").write_text(json.dumps(meta))
    with pytest.raises(ServeError, match="has profile min/opt/max"):
        write_model_repository(export, tmp_path / "repo", "tensorrt", plan=plan)
    Path(f"{plan}.json").write_text(json.dumps({**meta, "profile": want}))
    repo = write_model_repository(export, tmp_path / "repo", "tensorrt", plan=plan)
    version = repo / CLASSIFIER / "1"
    assert (version / plan_filename("9.0")).read_bytes() == b"engine"
    assert trt_recipe.onnx_is_fp16(version / "model.fp16.onnx") and not trt_recipe.onnx_is_fp16(version / "model.onnx")
