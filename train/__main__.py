"""``python -m train --config FILE [--set key=value ...]``: the same command single-process or under torchrun."""
from __future__ import annotations

import argparse
import os
import sys

from train.runlock import RunLock, RunLockError, arm_parent_death_signal
from train.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train SE-ResNet50 on an ImageFolder (train/ val/ test/). Run it as is for one process, or under "
                    "torchrun / `python -m launch local --nproc N` for DDP or DeepSpeed. Rerunning with the same "
                    "output_dir resumes from its last checkpoint (--set train.resume=false starts over). Writes "
                    "<output_dir>/report.json (test_top1, per-class recall, confusion matrix), checkpoints/, "
                    "metrics.jsonl and config.yaml.")
    p.add_argument("--config", help="YAML config (e.g. configs/demo.yaml); defaults apply without one")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.root=/data/imagenet --set train.epochs=5 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        # First thing under torchrun: die with the launcher (even a kill -9 of it), never train as an orphan.
        arm_parent_death_signal()
    except RunLockError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0

    from train.checkpoint import CheckpointError
    from train.data import DataError
    from train.engine import EngineError, Trainer, setup_logging
    from train.metrics import MetricsPortError
    from train.models import PretrainedError

    setup_logging()
    # One run per output folder: rank 0 takes <output_dir>/.lock before anything is built or written; the other
    # ranks check it too, so a refused run stops on every rank with the same sentence.
    lock = RunLock(cfg.output_dir, rank=int(os.environ.get("RANK", "0")))
    try:
        lock.acquire()
    except RunLockError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        trainer = Trainer(cfg)
        try:
            trainer.fit()
        finally:
            trainer.close()
    except (DataError, EngineError, CheckpointError, PretrainedError, ConfigError, MetricsPortError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
