"""Launchers: exact torchrun argv, CLI errors and help, and the Kubernetes job rendered from a config."""
from __future__ import annotations

import subprocess
import sys

import pytest

from launch.torchrun import (LaunchError, build_local_argv, build_multinode_argv, parse_endpoint, parse_nnodes,
                             trainer_args)
from tests.conftest import ROOT, SMOKE_CONFIG

PY = sys.executable


def run_cli(*args, timeout=60):
    return subprocess.run([PY, "-m", "launch", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_local_argv_is_standalone_torchrun_running_the_trainer_module():
    argv = build_local_argv(2, ["--config", "c.yaml", "--set", "data.root=/d"], python="/py")
    assert argv == ["/py", "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc-per-node=2",
                    "-m", "train", "--config", "c.yaml", "--set", "data.root=/d"]


def test_engine_becomes_a_trailing_override_so_it_wins_over_the_config():
    argv = build_local_argv(2, ["--config", "c.yaml", "--set", "engine=ddp"], engine="deepspeed", python="/py")
    assert argv[-4:] == ["--set", "engine=ddp", "--set", "engine=deepspeed"]
    # DeepSpeed runs under torchrun, never through its own SSH/pdsh launcher.
    assert "deepspeed" not in argv[:argv.index("train")] and argv[1:3] == ["-m", "torch.distributed.run"]


def test_multinode_argv_uses_c10d_rendezvous_with_elastic_bounds_and_restarts():
    argv = build_multinode_argv("2:4", 8, "node0.cluster:29400", "run-42", ["--config", "c.yaml"],
                                engine="ddp", max_restarts=5, python="/py")
    assert argv == ["/py", "-m", "torch.distributed.run", "--nnodes=2:4", "--nproc-per-node=8", "--rdzv-backend=c10d",
                    "--rdzv-endpoint=node0.cluster:29400", "--rdzv-id=run-42", "--max-restarts=5",
                    "-m", "train", "--config", "c.yaml", "--set", "engine=ddp"]
    assert "--nnodes=3" in build_multinode_argv("3", 1, "h:1", "x", python="/py")


@pytest.mark.parametrize("text,expected", [("2", (2, 2)), ("1:4", (1, 4)), (" 3 : 3 ", (3, 3))])
def test_parse_nnodes(text, expected):
    r = parse_nnodes(text)
    assert (r.min_nodes, r.max_nodes) == expected


@pytest.mark.parametrize("bad", ["0", "4:2", "a", "1:", "", "-1"])
def test_parse_nnodes_rejects(bad):
    with pytest.raises(LaunchError):
        parse_nnodes(bad)


@pytest.mark.parametrize("bad", ["host", ":29400", "host:0", "host:99999", "host:port"])
def test_parse_endpoint_rejects(bad):
    with pytest.raises(LaunchError):
        parse_endpoint(bad)


def test_launch_env_keeps_the_rendezvous_store_out_of_the_workers():
    """A node that rejoins an elastic job needs fresh store info each round (pytorch/pytorch#135712);
    tests/test_multinode.py proves the rejoin, this keeps the setting (and lets a user override it)."""
    from launch.torchrun import launch_env

    assert launch_env({})["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert launch_env({"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0"})["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "0"
    assert str(ROOT) in launch_env({})["PYTHONPATH"].split(":")


def test_trainer_args_strip_a_leading_separator():
    assert trainer_args(["--", "--config", "x"], None) == ["--config", "x"]


def test_cli_dry_run_prints_the_exact_command():
    r = run_cli("local", "--nproc", "2", "--engine", "deepspeed", "--dry-run", "--", "--config", "configs/smoke.yaml")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (f"{PY} -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node=2 -m train "
                                "--config configs/smoke.yaml --set engine=deepspeed")
    r = run_cli("multinode", "--nnodes", "1:2", "--nproc-per-node", "4", "--rdzv-endpoint", "n0:29400",
                "--rdzv-id", "j1", "--max-restarts", "0", "--dry-run", "--", "--config", "c.yaml")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (f"{PY} -m torch.distributed.run --nnodes=1:2 --nproc-per-node=4 --rdzv-backend=c10d "
                                "--rdzv-endpoint=n0:29400 --rdzv-id=j1 --max-restarts=0 -m train --config c.yaml")


@pytest.mark.parametrize("args,needle", [
    (["multinode", "--nnodes", "4:2", "--nproc-per-node", "8", "--rdzv-endpoint", "h:1", "--rdzv-id", "x"], "--nnodes 4:2"),
    (["multinode", "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-endpoint", "h", "--rdzv-id", "x"], "--rdzv-endpoint"),
    (["local", "--nproc", "0"], "--nproc must be >= 1"),
    (["k8s", "--config", "does/not/exist.yaml", "--out", "x"], "does not exist"),
    (["k8s", "--config", str(SMOKE_CONFIG), "--set", "cluster.nope=1", "--out", "x"], "Unknown config key 'cluster.nope'"),
    (["k8s", "--config", str(SMOKE_CONFIG), "--set", "cluster.gpus_per_node=0", "--out", "x"], "gpus_per_node must be >= 1"),
    (["k8s", "--config", str(SMOKE_CONFIG), "--kind", "indexed-job", "--set", "cluster.max_nnodes=4", "--out", "x"],
     "fixed number of nodes"),
])
def test_user_errors_exit_2_with_one_sentence(args, needle, tmp_path):
    args = [str(tmp_path / "out") if a == "x" else a for a in args]
    r = run_cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [l for l in r.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_help_is_accurate_for_every_subcommand():
    top = run_cli("--help")
    assert top.returncode == 0 and all(c in top.stdout for c in ("local", "multinode", "k8s"))
    for sub, flags in {"local": ["--nproc", "--engine", "--dry-run"],
                       "multinode": ["--nnodes", "--nproc-per-node", "--rdzv-endpoint", "--rdzv-id", "--max-restarts"],
                       "k8s": ["--config", "--out", "--kind", "--set", "--name", "--data-root"]}.items():
        r = run_cli(sub, "--help")
        assert r.returncode == 0, r.stderr
        for f in flags:
            assert f in r.stdout, (sub, f)
    # The examples in the top-level help parse (dry-run) as printed.
    assert run_cli("local", "--nproc", "8", "--engine", "deepspeed", "--dry-run", "--", "--config", "configs/demo.yaml").returncode == 0
