"""The GPU check's runner: ``python -m scripts.gpu_check --out DIR [--work DIR] [--tiny] [--budget S]``.

Every step (scripts/gpu_check/step.py STEPS) runs in its own process group under its own timeout (at most
--step-timeout, and never past the whole check's --budget: a step that would not fit is skipped with that reason),
its output appended to <out>/gpu_check.log, and <out>/gpu_check.json is rewritten after every step, so a run killed
from outside still leaves the steps it finished. Exit 1 when a step failed, else 0 (skipped steps are not failures).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.gpu_check.common import ROOT
from scripts.gpu_check.step import NEEDS_CUDA, STEPS

MIN_STEP_S = 15   # a step is not started with less time than this left in the budget
RUNNING: list = []   # the step process now running, ended with this runner on SIGTERM/SIGINT


def _stop(signum, _frame):
    for p in RUNNING:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(128 + signum)


def write_report(out: Path, report: dict) -> None:
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, out / "gpu_check.json")   # a reader (or a kill) never sees half a file


def run_one(name: str, args, work: Path, timeout: float, log) -> dict:
    cmd = [sys.executable, "-m", "scripts.gpu_check.step", name, "--out", str(args.out), "--work", str(work)]
    cmd += ["--tiny"] if args.tiny else []
    log.write(f"\n===== {name} (timeout {timeout:.0f} s)\n")
    log.flush()
    # its own process group (not a new session: whatever ends this run's session ends the steps too)
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, process_group=0,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    RUNNING[:] = [p]
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return {"status": "failed", "reason": f"timed out after {timeout:.0f} s", "figures": {}}
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)   # anything the step left behind (loader workers, a killed run)
        except ProcessLookupError:
            pass
    try:
        return json.loads((work / "steps" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {"status": "failed", "reason": f"the step's process exited {p.returncode} without a result "
                                              f"(see gpu_check.log)", "figures": {}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="report folder: gpu_check.json and gpu_check.log")
    ap.add_argument("--work", type=Path, help="scratch folder for data, checkpoints, ONNX (default: a temporary one)")
    ap.add_argument("--tiny", action="store_true", help="a CPU rehearsal: every step at toy sizes, CUDA or not")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the whole check (default 420)")
    ap.add_argument("--step-timeout", type=float, help="seconds per step at most (default 90; 600 with --tiny, whose "
                                                        "CPU runs are not bound by the GPU contract)")
    ap.add_argument("--only", nargs="+", action="extend", choices=list(STEPS),
                    help="run these steps only (and step data, which they need); repeatable")
    args = ap.parse_args(argv)
    if args.step_timeout is None:
        args.step_timeout = 600.0 if args.tiny else 90.0
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    t0 = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    own_work = args.work is None
    work = Path(tempfile.mkdtemp(prefix="gpu_check_")) if own_work else args.work
    (work / "steps").mkdir(parents=True, exist_ok=True)
    names = [n for n in STEPS if not args.only or n in args.only or n == "data"]
    report = {"check": "scripts/gpu_check.sh", "mode": "tiny" if args.tiny else "full", "python": sys.executable,
              "budget_s": args.budget, "step_timeout_s": args.step_timeout, "steps": [], "figures": {},
              "complete": False}
    write_report(args.out, report)
    failed = False
    with open(args.out / "gpu_check.log", "a") as log:
        for name in names:
            left = args.budget - (time.monotonic() - t0) - 10   # 10 s: the report, and the bundle install before us
            s0 = time.monotonic()
            if left < MIN_STEP_S:
                res = {"status": "skipped", "reason": f"over the check's {args.budget:.0f} s budget", "figures": {}}
            elif name in NEEDS_CUDA and not args.tiny and report["figures"].get("facts", {}).get("cuda_available") is False:
                res = {"status": "skipped", "reason": "no CUDA", "figures": {}}
            else:
                res = run_one(name, args, work, min(args.step_timeout, left), log)
            step = {"name": name, "status": res["status"], "reason": res.get("reason", ""),
                    "seconds": round(time.monotonic() - s0, 1)}
            report["steps"].append(step)
            report["figures"][name] = res.get("figures", {})
            report["seconds"] = round(time.monotonic() - t0, 1)
            failed |= res["status"] == "failed"
            write_report(args.out, report)
            print(f"{name:28s} {step['status']:8s} {step['seconds']:6.1f} s  {step['reason'][:150]}", flush=True)
    report["complete"] = True
    report["seconds"] = round(time.monotonic() - t0, 1)
    write_report(args.out, report)
    if own_work:
        subprocess.run(["rm", "-rf", str(work)])
    print(f"wrote {args.out / 'gpu_check.json'} in {report['seconds']} s"
          f"{': a step FAILED' if failed else ''}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
