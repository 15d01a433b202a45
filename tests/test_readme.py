"""The README cannot drift: its generated references are in sync, and its commands run as written
(with paths swapped for test data, training capped at a few steps, launchers in --dry-run)."""
import json
import re
import shlex
import signal
import subprocess
import time
import urllib.request

import pytest

from tests.conftest import PY, ROOT, free_port, subprocess_env

README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                cmds.append(line)
    return cmds


def _argv(cmd: str) -> list[str]:
    argv = shlex.split(cmd)
    if argv[0] in (".venv/bin/python", "python"):
        argv[0] = PY
    elif argv[0] in (".venv/bin/seresnet", "seresnet"):
        argv = [PY, "-m", "seresnet", *argv[1:]]
    return argv


def _run(argv, timeout=300, **kw):
    return subprocess.run(argv, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout, **kw)


def test_reference_sections_are_in_sync():
    r = _run([PY, "-m", "scripts.readme", "--check"])
    assert r.returncode == 0, r.stderr


def test_quick_start_and_make_targets_exist():
    cmds = readme_commands()
    assert cmds[:2] == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test", "bench", "readme"):
        assert re.search(rf"^{target}:", makefile, re.M), target
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_train_command_resolves(tiny_imagefolder, tmp_path):
    cmds = [c for c in readme_commands() if "seresnet train " in c]
    assert cmds
    for cmd in cmds:
        argv = _argv(cmd.replace("/path/to/imagefolder", str(tiny_imagefolder)).replace("runs/mine", str(tmp_path)))
        r = _run(argv + ["--print-config"])
        assert r.returncode == 0, (cmd, r.stderr)
        assert str(tiny_imagefolder) in r.stdout and "se_resnet50" in r.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_your_own_images_commands_run_as_written(tmp_path, tiny_imagefolder):
    """export && repository -> up -> classify -> offline evaluate: exactly the README lines with our paths and free
    ports (the training line is checked above; a random-weight checkpoint stands in for its result)."""
    from scripts.samples import random_checkpoint

    run = tmp_path / "mine"
    last = random_checkpoint(run / "checkpoints", classes=["circle", "square", "triangle"])
    last.rename(run / "checkpoints" / "best.pt")
    last.with_name("last.pt.sha256").rename(run / "checkpoints" / "best.pt.sha256")

    def ours(cmd: str) -> str:
        return cmd.replace("runs/mine", str(run)).replace("/path/to/imagefolder", str(tiny_imagefolder))

    cmds = {shlex.split(c)[1] + (" " + shlex.split(c)[2] if shlex.split(c)[1] == "serve" else ""): c
            for c in readme_commands() if "seresnet " in c}
    assert set(cmds) >= {"train", "serve export", "serve up", "serve classify", "evaluate"}, cmds
    for part in ours(cmds["serve export"]).split(" && "):
        r = _run(_argv(part))
        assert r.returncode == 0, (part, r.stderr)
    assert (run / "model_repository" / "classify" / "config.pbtxt").is_file()
    ports = {p: str(free_port()) for p in ("8000", "8001", "8002")}
    up = ours(cmds["serve up"])
    for old, new in ports.items():
        up = up.replace(f"port {old}", f"port {new}")
    server = subprocess.Popen(_argv(up), cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        deadline = time.time() + 240
        ready = False
        while time.time() < deadline and server.poll() is None and not ready:
            try:
                ready = urllib.request.urlopen(f"http://127.0.0.1:{ports['8000']}/v2/health/ready", timeout=2).status == 200
            except OSError:
                time.sleep(1)
        assert ready, "server did not become ready"
        classify = ours(cmds["serve classify"]).replace("127.0.0.1:8001", f"127.0.0.1:{ports['8001']}")
        r = _run(_argv(classify))
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("circle_") == 6 and r.stdout.count("square_") == 6
    finally:
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=60)
    assert server.returncode == 0, out[-2000:]
    r = _run(_argv(ours(cmds["evaluate"])))
    assert r.returncode == 0, r.stderr
    report = json.loads((run / "offline" / "report.json").read_text())
    assert report["images"] == 18 and report["errors"] == 0 and report["classes"] == ["circle", "square", "triangle"]
