"""Real trainer runs on a tiny ImageFolder: a time budget fixes the step count and the schedule ends at eta_min;
a rerun with a changed lr/epochs resumes and honours them; a changed image size or class list refuses in one sentence;
EMA weights are what best.pt holds for export."""
import hashlib
import json
import shutil
import subprocess

import pytest
import torch

from tests.conftest import PY, ROOT, SMOKE_CONFIG, make_imagefolder, subprocess_env
from train.checkpoint import verify
from train.config import load_config
from train.optim import LrSchedule

pytestmark = pytest.mark.slow


def train(out, data, *sets, timeout=600):
    cmd = [PY, "-m", "train", "--config", str(SMOKE_CONFIG), "--set", f"data.root={data}", "--set", f"output_dir={out}",
           "--set", "metrics.enabled=false"]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_time_budget_fixes_the_steps_and_ends_at_eta_min(tiny_imagefolder, tmp_path):
    out = tmp_path / "budget"
    r = train(out, tiny_imagefolder, "train.time_budget=40s", "train.epochs=1", "schedule.eta_min=0.0001",
              "train.checkpoint_every_steps=0")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    b = report["budget"]
    assert report["time_budget"] == "40s" and b["fixed"] and b["budget_seconds"] == 40
    assert b["measured_steps_per_second"] > 0 and report["steps"] == b["total_steps"]
    assert report["final_lr"] == pytest.approx(1e-4, rel=1e-9)
    assert report["epochs"] == pytest.approx(report["images_seen"] / 48, abs=1e-3)
    assert "time budget 40s: measured" in r.stderr
    # A rerun keeps the fixed count: nothing left to train, only re-evaluated.
    again = train(out, tiny_imagefolder, "train.time_budget=40s", "train.epochs=1", "schedule.eta_min=0.0001",
                  "train.checkpoint_every_steps=0")
    assert again.returncode == 0 and json.loads((out / "report.json").read_text())["steps"] == b["total_steps"]


def test_resume_honours_a_lowered_lr_and_more_epochs(tiny_imagefolder, tmp_path):
    out = tmp_path / "run"
    first = train(out, tiny_imagefolder, "train.epochs=1", "optim.lr=0.002", "train.checkpoint_every_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    r = train(out, tiny_imagefolder, "train.epochs=2", "optim.lr=0.0005", "train.checkpoint_every_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr and "changed optim.lr (0.002 -> 0.0005)" in r.stderr
    assert "changed train.epochs (1.0 -> 2.0)" in r.stderr
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    after = [x["lr"] for x in lines if "lr" in x and x["step"] > 12]
    assert after and max(after) <= 0.0005 + 1e-12, "the checkpoint's optimizer state must not override the new lr"
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 24 and report["resumed"]


@pytest.fixture(scope="module")
def trained_run(tiny_imagefolder, tmp_path_factory):
    """One finished 2-step run; each refusal test resumes a copy of it."""
    out = tmp_path_factory.mktemp("refuse") / "run"
    first = train(out, tiny_imagefolder, "train.max_steps=2", "train.checkpoint_every_steps=1")
    assert first.returncode == 0, first.stderr[-3000:]
    return out


@pytest.mark.parametrize("change, says", [("data.image_size=24", "data.image_size differs"),
                                          ("model.se_reduction=8", "model differs"),
                                          ("optim.name=sgd", "optim.name differs")])
def test_resume_refuses_an_incompatible_config(tiny_imagefolder, trained_run, tmp_path, change, says):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    before = contents(out / "checkpoints")
    r = train(out, tiny_imagefolder, "train.max_steps=4", change)
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("error: ") and says in err and "train.resume=false" in err and "Traceback" not in r.stderr
    assert contents(out / "checkpoints") == before, "nothing lost or overwritten (names and bytes)"


def contents(folder) -> dict:
    """name -> SHA-256 of every file under ``folder``: equal before and after means nothing was touched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_checkpoint_corrupt_refuses_in_one_sentence_and_resume_false_starts_over(trained_run, tiny_imagefolder,
                                                                                      tmp_path):
    """No checkpoint verifies: the rerun refuses (it used to start again from step 0 in the same folder, overwriting
    the history); --set train.resume=false starts over and keeps the old folder aside."""
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    ck = out / "checkpoints"
    for p in ck.glob("*.pt"):   # step-*.pt, last.pt and best.pt: every one (hard links share the damage)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    before = contents(ck)
    r = train(out, tiny_imagefolder, "train.max_steps=4")
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "can be resumed (newest: checkpoint" in errors[0] and "corrupt or truncated" in errors[0], errors[0]
    assert "nothing was overwritten" in errors[0] and "--set train.resume=false" in errors[0], errors[0]
    assert contents(ck) == before, "the refused run touched the checkpoints"
    assert not (out / "report.json").exists() or json.loads((out / "report.json").read_text())["steps"] == 2

    r = train(out, tiny_imagefolder, "train.max_steps=3", "train.resume=false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert contents(out / "checkpoints.replaced") == before, "the old history is kept aside, byte for byte"
    assert "moved the existing checkpoints to" in r.stderr and "resuming from" not in r.stderr
    steps = sorted(int(p.name[5:13]) for p in ck.glob("step-*.pt"))
    assert steps and max(steps) == 3, steps
    for p in ck.glob("*.pt"):
        verify(p)


def test_resume_with_a_changed_schedule_follows_the_new_schedule_from_the_resumed_position(tiny_imagefolder, tmp_path):
    """cosine for 1 epoch, then the same folder with warm restarts (T_0=0.5) and a higher eta_min for 2 epochs: every
    step after the resume uses the new schedule's lr at its position (images seen), none the old one's."""
    out = tmp_path / "run"
    first = train(out, tiny_imagefolder, "train.epochs=1", "schedule.name=cosine", "schedule.eta_min=1e-6",
                  "train.checkpoint_every_steps=0")
    assert first.returncode == 0, first.stderr[-3000:]
    new = ("train.epochs=2", "schedule.name=cosine_warm_restarts", "schedule.T_0=0.5", "schedule.eta_min=0.0001",
           "train.checkpoint_every_steps=0")
    r = train(out, tiny_imagefolder, *new)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr and "resuming with a changed schedule" in r.stderr, r.stderr[-3000:]
    cfg = load_config(str(SMOKE_CONFIG), [f"data.root={tiny_imagefolder}", *new])
    sched = LrSchedule.from_config(cfg, cfg.optim.lr, 48, 96)   # 1 rank x batch 4: 12 steps an epoch, 24 in all
    logged = {x["step"]: x["lr"] for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "lr" in x}
    after = {s: lr for s, lr in logged.items() if s > 12}
    assert sorted(after) == list(range(13, 25)), sorted(logged)
    for s, lr in after.items():
        assert lr == pytest.approx(sched((s - 1) * 4), rel=1e-9), (s, lr, sched((s - 1) * 4))
    old = LrSchedule.from_config(load_config(str(SMOKE_CONFIG), [f"data.root={tiny_imagefolder}", "train.epochs=2",
                                                                 "schedule.name=cosine", "schedule.eta_min=1e-6"]),
                                 cfg.optim.lr, 48, 96)
    assert any(abs(lr - old((s - 1) * 4)) > 1e-6 for s, lr in after.items()), "the schedules must differ to prove it"


def test_resume_refuses_a_different_class_list(trained_run, tiny_imagefolder, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    other = make_imagefolder(tmp_path / "four", classes=4, counts=(8, 4, 4))
    r = train(out, other, "train.max_steps=4")
    assert r.returncode == 2 and "classes" in r.stderr and "train.resume=false" in r.stderr, r.stderr[-2000:]
    # The same number of classes under another name: the weights would load, the labels would be wrong.
    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_imagefolder, renamed)
    first = sorted(p.name for p in (renamed / "train").iterdir() if p.is_dir())[0]
    for split in (p for p in renamed.iterdir() if (p / first).is_dir()):
        (split / first).rename(split / "zz_renamed")
    r = train(out, renamed, "train.max_steps=4")
    assert r.returncode == 2 and "was trained on 3 classes" in r.stderr and "zz_renamed" in r.stderr, r.stderr[-2000:]


def test_ema_weights_are_checkpointed_for_export(tiny_imagefolder, tmp_path):
    out = tmp_path / "ema"
    r = train(out, tiny_imagefolder, "train.max_steps=4", "train.ema_decay=0.5", "train.checkpoint_every_steps=0")
    assert r.returncode == 0, r.stderr[-3000:]
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert "train_model" in last, "raw weights kept for resume"
    differs = [k for k, v in last["model"].items() if v.is_floating_point() and not torch.equal(v, last["train_model"][k])]
    assert differs, "best/last 'model' holds the EMA weights, not the raw ones"
    assert json.loads((out / "report.json").read_text())["ema_decay"] == 0.5


def test_a_data_set_changed_since_the_checkpoint_is_named_and_handled_by_the_rule(trained_run, tiny_imagefolder,
                                                                                 tmp_path):
    """Files added to train/ and removed from val/ between the run and its resume: each split is named with its file
    counts; training goes on over the current files, and best.pt is chosen afresh (its old score was measured on
    other images). The new checkpoints record the current listing."""
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    data = tmp_path / "images"
    shutil.copytree(tiny_imagefolder, data)
    shutil.copy(data / "train" / "circle" / "circle_000.png", data / "train" / "circle" / "extra.png")
    (data / "val" / "square" / "square_000.png").unlink()
    before = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["data_listing"]
    assert before["train"]["files"] == 48 and before["val"]["files"] == 18
    r = train(out, data, "train.max_steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the train/ files changed since the checkpoint (48 then, 49 now" in r.stderr, r.stderr[-3000:]
    assert "the val/ files changed since the checkpoint (18 then, 17 now" in r.stderr, r.stderr[-3000:]
    assert "test/ files changed" not in r.stderr
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert last["data_listing"]["train"]["files"] == 49 and last["data_listing"]["val"]["files"] == 17
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    assert best["global_step"] == 4 and best["best_top1"] == best["val_top1"], (best["global_step"], best["best_top1"])
    again = train(out, data, "train.max_steps=4")   # the same files now: no warning
    assert again.returncode == 0 and "files changed since the checkpoint" not in again.stderr, again.stderr[-2000:]
