"""scripts/gpu_check.sh and its runner, the parts that need no GPU and no long run: arguments, the offline bundle
install it would do, the step list against docs/cluster.md, timeouts and the budget, and the synthetic photos.
The device-mode run itself is simulated in tests/test_gpu_check_sim.py."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from scripts.gpu_check.step import STEPS

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"
DOCS = (ROOT / "docs" / "cluster.md").read_text().split("## 9. On a GPU", 1)[1]


def sh(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(GPU_CHECK), *args], capture_output=True, text=True, timeout=120, cwd=ROOT, **kw)


def test_script_parses_and_rejects_bad_arguments_in_one_sentence(tmp_path):
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)]).returncode == 0
    r = sh("--help")
    assert r.returncode == 0 and "--device" in r.stdout and "--tiny" in r.stdout
    for bad, needle in ((["--bogus"], "unknown argument '--bogus'"), (["--budget", "0"], "--budget needs a whole number"),
                        (["--python", "/nonexistent/py", "--out", str(tmp_path)], "interpreter '/nonexistent/py' not found")):
        r = sh(*bad)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr


def test_device_dry_run_installs_the_bundle_offline_and_lists_every_step(tmp_path):
    r = sh("--device", "--dry-run", "--out", str(tmp_path / "gc"), env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    install = next(l for l in r.stdout.splitlines() if l.startswith("+ [install]"))
    for flag in ("--no-index", "--no-deps", "--find-links .gpu", "--target", "-r .gpu/requirements.txt"):
        assert flag in install, install
    assert install.split()[2] == "python3", "device mode uses python3 from PATH"
    assert [l[9:] for l in r.stdout.splitlines() if l.startswith("+ [step] ")] == list(STEPS)


def test_make_targets_gitignore_and_docs_name_every_step_and_figure():
    mk = (ROOT / "Makefile").read_text()
    assert re.search(r"^gpu-bundle: venv\n\tbash scripts/gpu_bundle.sh$", mk, re.M)
    assert re.search(r"^gpu-check: venv\n\tbash scripts/gpu_check.sh --out runs/gpu_check$", mk, re.M)
    assert ".gpu/" in (ROOT / ".gitignore").read_text().split()
    for name in STEPS:
        assert f"`{name}`" in DOCS, name
    for figure in ("trainer_vs_plain", "plain_peak_gib", "sm_clock_mhz", "weights_equal", "max_abs_weight_diff",
                   "zero1_peak_vs_ddp", "loss_scale_after", "overflow_step_skipped", "max_abs_diff_vs_fp32_tf32_off",
                   "compute_capability", "driver", "cudnn", "arch_list"):
        assert f"`{figure}`" in DOCS, figure
    assert "bash scripts/gpu_check.sh --device --out /tmp/gc" in DOCS and "make gpu-bundle" in DOCS


def test_step_timeouts_and_the_budget_are_recorded_and_the_report_stays_valid(tmp_path):
    """A step past its timeout is killed and failed; a step that would not fit the budget is skipped; the JSON is
    complete and the exit status says a step failed."""
    out = tmp_path / "gc"
    r = subprocess.run([sys.executable, "-m", "scripts.gpu_check", "--out", str(out), "--work", str(tmp_path / "w"),
                        "--only", "facts", "--step-timeout", "1", "--budget", "40"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["complete"] and [s["name"] for s in report["steps"]] == ["facts", "data"]   # data: what facts needs
    first = report["steps"][0]
    assert first["status"] == "failed" and first["reason"] == "timed out after 1 s" and first["seconds"] < 10
    r = subprocess.run([sys.executable, "-m", "scripts.gpu_check", "--out", str(out), "--work", str(tmp_path / "w"),
                        "--only", "facts", "--budget", "10"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    report = json.loads((out / "gpu_check.json").read_text())
    assert r.returncode == 0 and {s["status"] for s in report["steps"]} == {"skipped"}
    assert report["steps"][0]["reason"] == "over the check's 10 s budget"


def test_the_check_draws_photo_like_jpegs_of_10_classes(tmp_path):
    from scripts.gpu_check.common import GPU, Ctx
    from scripts.gpu_check.facts import data

    figures = data(Ctx(tmp_path, tmp_path, tiny=False))
    assert figures["images"] == sum(GPU.per_class) * 10 >= 2000 and figures["min_side_px"] >= 400
    a = np.asarray(Image.open(tmp_path / "data" / "train" / "class0" / "0000.jpg"), np.float32)
    b = np.asarray(Image.open(tmp_path / "data" / "train" / "class7" / "0000.jpg"), np.float32)
    assert Image.open(tmp_path / "data" / "val" / "class3" / "0001.jpg").format == "JPEG"
    assert a.std() > 10 and b.std() > 10, "shapes and noise, not flat colour"
    assert abs(a.mean(axis=(0, 1)) - b.mean(axis=(0, 1))).max() > 5, "classes differ in colour"
