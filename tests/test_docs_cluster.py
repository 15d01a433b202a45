"""Every command in docs/cluster.md parses as written, and its config validates for its engine on the GPU the
command targets (train.hardware.decide, the rule book every job start runs); the files and kustomizations it
names exist; rendered Kubernetes jobs build and validate."""
from __future__ import annotations

import re
import shlex

import pytest

from launch.__main__ import build_parser as launch_parser
from launch.__main__ import _split_train_args
from scripts import validate_manifests as v
from launch.torchrun import REPO_ROOT, build_local_argv, build_multinode_argv
from train.__main__ import build_parser as train_parser
from train.compat import image_for_arch
from train.config import load_config
from train.hardware import Facts, decide

DOC = REPO_ROOT / "docs" / "cluster.md"
# Shell the docs use around commands (Slurm variables, command substitution): stand-ins a parser can read.
SHELL_STANDINS = [(re.compile(r'"\$\(scontrol show hostnames "\$SLURM_JOB_NODELIST" \| head -n1\)(:\d+)"'), r"node0\1"),
                  (re.compile(r'"\$SLURM_JOB_ID"'), "12345"), (re.compile(r'"\$\(openssl rand -hex 24\)"'), "x")]


# `seresnet <group> ...` is the installed command for `python -m <module> ...`: one parser (seresnet/cli.py).
CLI_ALIASES = (("seresnet launch ", "python -m launch "), ("seresnet preflight ", "python -m launch preflight "),
               ("seresnet train ", "python -m train "), ("seresnet serve ", "python -m serve "))


def _module_form(cmd: str) -> str:
    for alias, module in CLI_ALIASES:
        if cmd.startswith(alias):
            return module + cmd[len(alias):]
    return cmd


def doc_commands() -> list[str]:
    """Every command line of the ```bash blocks (continuations joined, `&&` / `|` / `&` split, `bash -c '...'` opened)."""
    text = DOC.read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            for pat, rep in SHELL_STANDINS:
                line = pat.sub(rep, line)
            if not line:
                continue
            tokens = shlex.split(line)
            if "-c" in tokens and tokens[0] in ("bash", "srun") or tokens[:2] == ["srun", "--nodes=4"]:
                line = tokens[tokens.index("-c") + 1]
            for part in re.split(r"\s(?:&&|\|\||\||&)(?:\s|$)", line + " "):
                if part.strip():
                    out.append(_module_form(part.strip()))
    return out


def target_facts(arch: str) -> Facts:
    """A cluster node of compute capability ``arch`` running the training image built for it (train/compat.yaml)."""
    _, row = image_for_arch(arch)
    archs = [f"sm_{a.replace('.', '')}" for a in row["archs"]]
    return Facts(gpu_arch=arch, gpu_count=8, gpus_allocated=["nvidia.com/gpu=8"], cuda_usable=True,
                 torch_cuda=row["cuda"], torch_cuda_archs=archs, dali_installed=True, deepspeed_installed=True,
                 described=True)


def check_config(config: str, overrides: list[str], engine: str | None, where: str):
    cfg = load_config(REPO_ROOT / config if (REPO_ROOT / config).is_file() else config, overrides)   # a file or a packaged name
    for arch in ([cfg.cluster.gpu_arch] if cfg.cluster.gpu_arch else ["7.0", "8.0", "9.0"]):
        plan = decide(cfg, target_facts(arch), engine)
        assert plan.problems == [], f"docs/cluster.md `{where}` on compute capability {arch}: {plan.problems}"
    return cfg


COMMANDS = doc_commands()
LAUNCH = [c for c in COMMANDS if c.startswith("python -m launch ") and not c.startswith("python -m launch.")]


def test_the_docs_use_the_imagenet_recipe_and_cover_every_launcher():
    assert "configs/demo.yaml" not in DOC.read_text(), "docs/cluster.md must run the cluster recipe configs/imagenet.yaml"
    subs = {shlex.split(c)[3] for c in LAUNCH}
    assert {"local", "multinode", "k8s"} <= subs, subs
    assert any("--engine deepspeed" in c for c in LAUNCH)
    assert any("srun" in c for c in re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S))


@pytest.mark.parametrize("cmd", LAUNCH, ids=lambda c: c[:80])
def test_every_launch_command_parses_and_its_config_validates_for_its_engine(cmd, tmp_path, kubectl):
    own, train_args = _split_train_args(shlex.split(cmd)[3:])
    try:
        args = launch_parser().parse_args(own)
    except SystemExit:
        pytest.fail(f"docs/cluster.md: `{cmd}` does not parse (python -m launch {' '.join(own)})")
    if args.command in ("local", "multinode"):
        if args.command == "local":
            build_local_argv(args.nproc, train_args, engine=args.engine)
        else:
            build_multinode_argv(args.nnodes, args.nproc_per_node, args.rdzv_endpoint, args.rdzv_id, train_args,
                                 engine=args.engine, max_restarts=args.max_restarts)
        targs = train_parser().parse_args(train_args)
        check_config(targs.config, targs.overrides, args.engine, cmd)
        return
    if args.command == "preflight":
        check_config(args.config, args.overrides, args.engine, cmd)
        return
    assert args.command == "k8s"
    from launch.k8s import options_from_args, render_training_job
    cfg = check_config(args.config, args.overrides, None, cmd)
    out = render_training_job(cfg, tmp_path / "job", kind=args.kind, name=args.name, data_root=args.data_root,
                              **options_from_args(args))
    for obj in v.kustomize_build(out, kubectl):
        v.validate_object(obj)


def test_other_project_commands_parse():
    for cmd in COMMANDS:
        tokens = shlex.split(cmd)
        if tokens[:3] == ["python", "-m", "train"]:
            targs = train_parser().parse_args(tokens[3:])
            check_config(targs.config, targs.overrides, None, cmd)
        elif tokens[:3] == ["python", "-m", "scripts.validate_manifests"]:
            assert len(tokens) == 3
        elif tokens[:3] == ["python", "-m", "scripts.monitoring"]:
            assert set(tokens[3:]) <= {"--check"}
        elif tokens[:2] == ["docker", "build"]:
            assert (REPO_ROOT / tokens[tokens.index("-f") + 1]).is_file(), cmd
        elif tokens[:2] == ["make", "gpu-check"]:
            assert re.search(r"^gpu-check:", (REPO_ROOT / "Makefile").read_text(), re.M), "Makefile has no gpu-check target"
        elif tokens[:3] == ["kubectl", "apply", "-k"] and tokens[3].startswith("k8s/"):
            assert (REPO_ROOT / tokens[3] / "kustomization.yaml").is_file(), cmd


def test_docs_apply_only_kustomizations_that_exist_or_were_rendered():
    rendered = {shlex.split(c)[shlex.split(c).index("--out") + 1] for c in LAUNCH if " k8s " in c}
    applied = [shlex.split(c)[3] for c in COMMANDS if c.startswith("kubectl apply -k")]
    assert len([p for p in applied if p.startswith("k8s/")]) >= 5
    for p in applied:
        assert p in rendered or (REPO_ROOT / p / "kustomization.yaml").is_file(), p
