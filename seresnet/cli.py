"""The ``seresnet`` command: one argparse root; each package registers its own verbs (as Hugging Face accelerate's
``commands/accelerate_cli.py`` does), so ``seresnet serve export`` and ``python -m serve export`` are one parser.

    seresnet train | evaluate | preflight
    seresnet serve  export | quantize | repository | up | classify | evaluate | trt
    seresnet launch local | multinode | k8s
"""
from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Optional, Sequence

import launch.__main__ as launch_cli
import serve.__main__ as serve_cli
import serve.offline_eval as offline_eval
import train.__main__ as train_cli

EPILOG = """examples:
  seresnet train --config demo --set data.root=/path/to/imagefolder --set output_dir=runs/mine
  seresnet launch local --nproc 2 -- --config demo --set data.root=/path/to/imagefolder
  seresnet preflight --config imagenet --gpu-arch 9.0 --json
  seresnet serve export --checkpoint runs/mine/checkpoints/best.pt --out runs/mine/export
  seresnet launch k8s --config imagenet --kind trainjob --out k8s-job && kubectl apply -k k8s-job
--config takes a YAML file or the name of a packaged config: demo, imagenet, smoke."""


def _version() -> str:
    try:
        return version("seresnet-stack")
    except PackageNotFoundError:   # a source checkout that was never installed
        return "source checkout"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="seresnet", description="Train SE-ResNet50, export it, serve it with Triton, "
                                 "launch it on a cluster.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"seresnet-stack {_version()}")
    sub = ap.add_subparsers(dest="group", required=True, metavar="COMMAND")
    train_cli.register(sub)
    offline_eval.register(sub)
    launch_cli.register_preflight(sub)
    serve_cli.register(sub)
    launch_cli.register(sub)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Arguments after `--` go to the trainer (`seresnet launch local|multinode ... -- TRAIN_ARGS`), unparsed here.
    own, trailing = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(own)
    if "--" in argv and args.group != "launch":
        print(f"error: `seresnet {args.group}` takes no arguments after `--`; they go to the trainer under "
              "`seresnet launch local|multinode`.", file=sys.stderr)
        return 2
    return args.run(args, trailing)


if __name__ == "__main__":
    sys.exit(main())
