"""Step ``train_resume``: the real trainer (``python -m train``, torchvision backend, precision auto, channels_last)
on the check's own JPEGs for a few hundred steps, twice at once: run A straight through; run B SIGKILLed (its whole
process group, loader workers too) right after its checkpoint at step ``kill_at``, then rerun with the same command
until it resumes and finishes. A's and B's final weights must be equal. Both runs ask for deterministic kernels
(cudnn.deterministic, torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG) before the trainer starts, so a
difference is the resume's, not the GPU's atomics."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from scripts.gpu_check.common import ROOT, TINY_THREADS, CheckFailed, Ctx

# prctl(PR_SET_PDEATHSIG=1, SIGKILL=9): a trainer dies with this step's process (the runner's timeout kills the step
# by its process group; each trainer has a group of its own, so that run B can be killed with its loader workers).
DETERMINISTIC_MAIN = ("import ctypes, sys, torch; ctypes.CDLL(None).prctl(1, 9, 0, 0, 0); "
                      "torch.backends.cudnn.deterministic = True; "
                      "torch.use_deterministic_algorithms(True, warn_only=True); "
                      "from train.__main__ import main; sys.exit(main(sys.argv[1:]))")
SAVED = re.compile(r"checkpoint saved at step (\d+)")


def _argv(ctx: Ctx, out: Path) -> list[str]:
    s = ctx.sizes
    sets = [f"output_dir={out}", f"data.root={ctx.data}", "data.backend=torchvision", f"data.batch_size={s.train_batch}",
            f"data.image_size={s.train_image}", f"data.eval_resize={s.train_image + s.train_image // 8}",
            f"data.workers={s.train_workers}", "model.stem=imagenet", "train.precision=auto", "train.channels_last=on",
            f"train.max_steps={s.train_steps}", f"train.checkpoint_every_steps={s.kill_at}", "train.eval_every_epochs=1000",
            f"train.log_every_steps={max(1, s.train_steps // 10)}", "metrics.enabled=false",
            f"train.threads={TINY_THREADS if ctx.tiny else 0}"]
    return [sys.executable, "-c", DETERMINISTIC_MAIN] + [a for kv in sets for a in ("--set", kv)]


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            process_group=0)


def _finish(p: subprocess.Popen, log: Path, what: str) -> None:
    if p.wait() != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"{what} exited {p.returncode}: " + " | ".join(tail))


def _weights(out: Path) -> dict:
    from train.checkpoint import safe_load

    return safe_load(out / "checkpoints" / "last.pt")["model"]


def run(ctx: Ctx) -> dict:
    ctx.device   # noqa: B018 - skipped without CUDA (the trainer on a CPU is the test suite's)
    s = ctx.sizes
    base = ctx.work / "train_resume"
    a_out, b_out = base / "straight", base / "killed"
    base.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    a = _start(_argv(ctx, a_out), base.with_suffix(".a.log"))
    b_log = base.with_suffix(".b1.log")
    b = _start(_argv(ctx, b_out), b_log)
    killed_after = None
    while b.poll() is None:
        found = [int(m) for m in SAVED.findall(b_log.read_text())]
        if found and max(found) >= s.kill_at:
            os.killpg(b.pid, signal.SIGKILL)   # the trainer and its DataLoader workers, mid-run
            killed_after = max(found)
            break
        time.sleep(0.05)
    b.wait()
    if killed_after is None:
        raise RuntimeError(f"run B ended (exit {b.returncode}) before its checkpoint at step {s.kill_at}; "
                           f"see {b_log}")
    b2_log = base.with_suffix(".b2.log")
    b2 = _start(_argv(ctx, b_out), b2_log)
    _finish(b2, b2_log, "the resumed run")
    _finish(a, base.with_suffix(".a.log"), "the straight run")
    seconds = time.perf_counter() - t0
    wa, wb = _weights(a_out), _weights(b_out)
    diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa if wa[k].is_floating_point())
    rep_a = json.loads((a_out / "report.json").read_text())
    rep_b = json.loads((b_out / "report.json").read_text())
    resumed_from = re.search(r"resuming from \S+ \(epoch [\d.]+, step (\d+)", b2_log.read_text())
    figures = {"steps": rep_a["steps"], "batch": s.train_batch, "image_px": s.train_image,
               "precision": rep_a["precision"], "killed_after_checkpoint_step": killed_after,
               "resumed_from_step": int(resumed_from.group(1)) if resumed_from else None,
               "resumed_report_flag": rep_b["resumed"], "max_abs_weight_diff": diff,
               "weights_equal": diff == 0.0 and set(wa) == set(wb),
               "train_img_s": rep_a["train_images_per_second"], "test_top1_straight": rep_a.get("test_top1"),
               "test_top1_resumed": rep_b.get("test_top1"), "seconds": round(seconds, 1),
               "checkpoint": str(a_out / "checkpoints" / "last.pt"), "device": rep_a["device"],
               "torch": torch.__version__}
    if not figures["weights_equal"] or figures["resumed_from_step"] is None:
        raise CheckFailed(figures, f"killed-and-resumed weights differ from the straight run's by {diff:.3g} "
                           f"(resumed from step {figures['resumed_from_step']})")
    return figures
