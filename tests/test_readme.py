"""The README cannot drift: its generated references are in sync, and its commands run as written
(with paths swapped for test data, training capped at a few steps, launchers in --dry-run)."""
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


def test_train_commands_resolve(tiny_imagefolder, tmp_path):
    cmds = [c for c in readme_commands() if " -m train " in c]
    assert cmds
    for cmd in cmds:
        argv = _argv(cmd.replace("/path/to/imagefolder", str(tiny_imagefolder)).replace("runs/mine", str(tmp_path)))
        r = _run(argv + ["--print-config"])
        assert r.returncode == 0, (cmd, r.stderr)


def test_launch_commands_parse_and_render(tmp_path):
    cmds = [c for c in readme_commands() if " -m launch " in c]
    assert any(" local " in c for c in cmds) and any(" k8s " in c for c in cmds)
    for cmd in cmds:
        cmd = cmd.split(" && ")[0].replace("runs/k8s/imagenet", str(tmp_path / "k8s"))
        argv = _argv(cmd)
        sub = argv.index("launch") + 1
        if argv[sub] in ("local", "multinode"):
            argv.insert(sub + 1, "--dry-run")
        r = _run(argv)
        assert r.returncode == 0, (cmd, r.stdout, r.stderr)
        if argv[sub] == "preflight":
            assert "precision:" in r.stdout and "problems:      none" in r.stdout
        elif argv[sub] == "k8s":
            assert (tmp_path / "k8s" / "kustomization.yaml").exists()
        else:
            assert "torch.distributed.run" in r.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serving_commands_run_as_written(tmp_path, tiny_imagefolder):
    """export -> repository -> up -> classify -> evaluate, exactly the README lines with our paths and free ports."""
    from scripts.samples import random_checkpoint

    ckpt = random_checkpoint(tmp_path / "ckpt", classes=["circle", "square", "triangle"])
    repo = tmp_path / "repo"
    cmds = {c.split()[3]: c for c in readme_commands() if " -m serve " in c}
    assert set(cmds) >= {"export", "repository", "up", "classify", "evaluate"}
    export = tmp_path / "export"
    r = _run(_argv(cmds["export"].replace("runs/demo/train/checkpoints/best.pt", str(ckpt))
                   .replace("runs/export", str(export))))
    assert r.returncode == 0, r.stderr
    r = _run(_argv(cmds["repository"].replace("runs/export", str(export)).replace("runs/model_repository", str(repo))))
    assert r.returncode == 0, r.stderr
    ports = {p: str(free_port()) for p in ("8000", "8001", "8002")}
    up = cmds["up"].replace("runs/model_repository", str(repo))
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
        classify = cmds["classify"].replace("127.0.0.1:8001", f"127.0.0.1:{ports['8001']}") \
                                   .replace("data/animals/test/cat", str(tiny_imagefolder / "test" / "circle"))
        r = _run(_argv(classify))
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("circle_") == 6 and re.search(r"(circle|square|triangle)", r.stdout)
        evaluate = cmds["evaluate"].replace("127.0.0.1:8001", f"127.0.0.1:{ports['8001']}") \
                                   .replace("data/animals/test", str(tiny_imagefolder / "test")) \
                                   .replace("runs/evaluate", str(tmp_path / "evaluate"))
        r = _run(_argv(evaluate))
        assert r.returncode == 0, r.stderr
        assert "top-1" in r.stdout and (tmp_path / "evaluate" / "report.json").is_file()
        assert (tmp_path / "evaluate" / "confusion.png").stat().st_size > 0
    finally:
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=60)
    assert server.returncode == 0, out[-2000:]
