"""Command line: ``seresnet launch {local,multinode,k8s}`` and ``seresnet preflight`` (also ``python -m launch
{local,multinode,k8s,preflight}``); see ``--help`` of each."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Optional, Sequence

from launch.k8s import add_arguments as add_k8s_arguments
from launch.k8s import KINDS, options_from_args, render_training_job
from launch.torchrun import (ENGINES, LaunchError, build_local_argv, build_multinode_argv, launch_env)

EPILOG = """examples:
  seresnet launch local --nproc 2 -- --config smoke --set data.root=data/animals
  seresnet launch local --nproc 8 --engine deepspeed -- --config demo
  seresnet launch multinode --nnodes 2:4 --nproc-per-node 8 --rdzv-endpoint node0:29400 \\
      --rdzv-id run42 -- --config demo          (run the same command on every node)
  seresnet launch k8s --config imagenet --kind trainjob --out runs/k8s/imagenet && kubectl apply -k runs/k8s/imagenet
  seresnet preflight --config imagenet --gpu-arch 7.0      (what a V100 job would do)
(`python -m launch ...` is the same command; --config takes a YAML file or a packaged config: demo, imagenet, smoke)
"""
DESCRIPTION = ("Run the trainer (`seresnet train`) under torchrun on one machine or several nodes, or render its "
               "Kubernetes job. Arguments after `--` go to the trainer unchanged.")
PREFLIGHT_DESCRIPTION = ("Decide precision, data backend and channels_last for the job with the same code the trainer runs "
                         "at every start, and list the problems that would stop it (a torch build without kernels for the "
                         "GPU, GPUs allocated but CUDA unusable, a missing extra, bad paths). Exit status 1 when there is a "
                         "problem. With --gpu-arch a remote cluster is described and local paths in the config are not checked.")


def build_parser(ap: Optional[argparse.ArgumentParser] = None, with_preflight: bool = True) -> argparse.ArgumentParser:
    """``local``, ``multinode`` and ``k8s`` (and ``preflight`` for ``python -m launch``) on ``ap`` or a new parser."""
    ap = ap or argparse.ArgumentParser(prog="python -m launch", description=DESCRIPTION, epilog=EPILOG,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = ("local", "multinode", "k8s") + (("preflight",) if with_preflight else ())
    sub = ap.add_subparsers(dest="command", required=True, metavar="{" + ",".join(verbs) + "}")

    local = sub.add_parser("local", help="N processes on this machine (torchrun --standalone)",
                           description="Run N trainer processes on this machine with torchrun --standalone "
                                       "(rendezvous on a free local port). DeepSpeed runs under the same torchrun.",
                           usage="python -m launch local --nproc N [--engine {ddp,deepspeed}] [--dry-run] -- TRAIN_ARGS...")
    local.add_argument("--nproc", type=int, required=True, help="processes (one per GPU; on CPU, one per share of the cores)")
    local.add_argument("--engine", choices=ENGINES, help="sets --set engine=... for the trainer (default: the config's engine)")
    local.add_argument("--dry-run", action="store_true", help="print the exact command and exit")

    multi = sub.add_parser("multinode", help="one node of a multi-node job (c10d rendezvous; bare metal or Slurm)",
                           description="Run this same command on every node (bare metal, or `srun` once per node). "
                                       "torchrun's c10d rendezvous gathers MIN..MAX nodes at HOST:PORT, assigns node "
                                       "ranks, and restarts the worker group up to --max-restarts times on failures.",
                           usage="python -m launch multinode --nnodes MIN:MAX --nproc-per-node G --rdzv-endpoint HOST:PORT "
                                 "--rdzv-id ID [--max-restarts K] [--engine {ddp,deepspeed}] [--dry-run] -- TRAIN_ARGS...")
    multi.add_argument("--nnodes", required=True, help="N, or MIN:MAX for an elastic job")
    multi.add_argument("--nproc-per-node", type=int, required=True, help="processes per node (= GPUs per node)")
    multi.add_argument("--rdzv-endpoint", required=True, help="HOST:PORT of the rendezvous store (one of the nodes, e.g. the first)")
    multi.add_argument("--rdzv-id", required=True, help="job id shared by all nodes of this run")
    multi.add_argument("--max-restarts", type=int, default=3, help="worker-group restarts before failing (default 3)")
    multi.add_argument("--engine", choices=ENGINES, help="sets --set engine=... for the trainer")
    multi.add_argument("--dry-run", action="store_true", help="print the exact command and exit")

    if with_preflight:
        add_preflight_arguments(sub.add_parser("preflight", help="what a job will do on this machine or on described GPUs, "
                                               "and what stops it", description=PREFLIGHT_DESCRIPTION))
    k8s = sub.add_parser("k8s", help="render the Kubernetes training job from a training config",
                         description="Render a kustomize overlay (kustomization.yaml + train-config.yaml) that applies the "
                                     "repository's training manifests with this config: image, nodes, GPUs per node, engine, "
                                     "resources and PVCs come from its cluster.* and engine keys. Apply with `kubectl apply -k OUT`.")
    k8s.add_argument("--config", required=True, help="training config: a YAML file (the one `seresnet train` reads) or a packaged name")
    k8s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="config override, repeatable (e.g. --set cluster.nnodes=4)")
    k8s.add_argument("--out", required=True, help="output folder for the overlay")
    k8s.add_argument("--kind", choices=KINDS, default="pytorchjob",
                     help="trainjob: Kubeflow Trainer v2 TrainJob on the torch-distributed runtime; pytorchjob (default): "
                          "the legacy training-operator v1 PyTorchJob; indexed-job: a plain batch/v1 Indexed Job for "
                          "clusters without an operator")
    k8s.add_argument("--name", help="job name (default seresnet50-<engine>, seresnet50-trainjob-<engine> or seresnet50-indexed)")
    k8s.add_argument("--data-root", default="/data", help="ImageFolder path inside the pod (the data PVC is mounted at /data)")
    add_k8s_arguments(k8s)
    return ap


def add_preflight_arguments(pre: argparse.ArgumentParser) -> argparse.ArgumentParser:
    pre.add_argument("--config", required=True, help="training config: a YAML file or a packaged name (demo, imagenet, smoke)")
    pre.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    pre.add_argument("--engine", choices=ENGINES, help="override the config's engine")
    pre.add_argument("--gpu-arch", help="compute capability of the cluster's GPUs, e.g. 7.0 (V100), 8.0 (A100), 9.0 (H100)")
    pre.add_argument("--gpu-memory-gb", type=float, help="with --gpu-arch: memory of one GPU as its name gives it (16 for a V100 16GB, 80 for an H100 80GB; read as GiB): sizes the batch")
    pre.add_argument("--nnodes", type=int, default=1, help="nodes (default 1)")
    pre.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) per node (default 1)")
    pre.add_argument("--json", action="store_true", help="print one JSON object (precision, data_backend, torch_cuda_archs, problems, ...)")
    return pre


def register(sub) -> None:
    """``seresnet launch {local,multinode,k8s}``."""
    p = sub.add_parser("launch", help="torchrun on this machine or several nodes, or render the Kubernetes job",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    build_parser(p, with_preflight=False).set_defaults(run=run)


def register_preflight(sub) -> None:
    """``seresnet preflight``."""
    p = sub.add_parser("preflight", help="what a training job will do on this machine or on described GPUs, and what stops it",
                       description=PREFLIGHT_DESCRIPTION)
    add_preflight_arguments(p).set_defaults(command="preflight", run=run)


def _split_train_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: Optional[Sequence[str]] = None) -> int:
    own, train_args = _split_train_args(sys.argv[1:] if argv is None else argv)
    return run(build_parser().parse_args(own), train_args)


def run(args: argparse.Namespace, train_args: Sequence[str] = ()) -> int:
    train_args = list(train_args)
    try:
        if args.command == "preflight":
            from launch.preflight import preflight, render
            from train.config import ConfigError, load_config
            try:
                cfg = load_config(args.config, args.overrides)
                result = preflight(cfg, args.engine, args.gpu_arch, args.nnodes, args.nproc_per_node, args.gpu_memory_gb)
            except (ConfigError, ValueError) as err:
                raise LaunchError(str(err)) from None
            print(render(result, args.json))
            return 1 if result["problems"] else 0
        if args.command == "k8s":
            if train_args:
                raise LaunchError("`launch k8s` takes no trainer arguments after `--`; use --set KEY=VALUE.")
            from train.config import ConfigError, load_config
            try:
                cfg = load_config(args.config, args.overrides)
            except ConfigError as err:
                raise LaunchError(str(err)) from None
            out = render_training_job(cfg, args.out, kind=args.kind, name=args.name, data_root=args.data_root,
                                      **options_from_args(args))
            print(f"wrote the {args.kind} overlay {out}; apply with: kubectl apply -k {out}")
            return 0
        if args.command == "local":
            cmd = build_local_argv(args.nproc, train_args, engine=args.engine)
        else:
            cmd = build_multinode_argv(args.nnodes, args.nproc_per_node, args.rdzv_endpoint, args.rdzv_id,
                                       train_args, engine=args.engine, max_restarts=args.max_restarts)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    # exec: signals (Ctrl-C, SIGTERM from Slurm or the kubelet) reach torchrun directly.
    os.execve(cmd[0], cmd, launch_env())
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
