"""``seresnet train`` / ``python -m train --config FILE [--set key=value ...]``: the same command single-process or under torchrun."""
from __future__ import annotations

import argparse
import os
import sys

from train.runlock import RunLock, RunLockError, arm_parent_death_signal
from train.config import ConfigError, load_config
from train.storage import StorageError, check_writable, sentence_for


DESCRIPTION = ("Train SE-ResNet50 on an ImageFolder (train/ val/ test/). Run it as is for one process, or under "
               "torchrun / `seresnet launch local --nproc N` for DDP or DeepSpeed. Rerunning with the same "
               "output_dir resumes from its last checkpoint (--set train.resume=false starts over). Writes "
               "<output_dir>/report.json (test_top1, per-class recall, confusion matrix), checkpoints/, "
               "metrics.jsonl and config.yaml.")


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m train", description=DESCRIPTION)
    p.add_argument("--config", help="YAML config, or a packaged config's name (demo, imagenet, smoke); defaults apply without one")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.root=/data/imagenet --set train.epochs=5 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return p


def register(sub) -> None:
    """``seresnet train``."""
    p = sub.add_parser("train", help="train SE-ResNet50 (one process, or each process under torchrun)", description=DESCRIPTION)
    build_parser(p).set_defaults(run=lambda args, _rest: run(args))


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    try:
        # First thing under torchrun: die with the launcher (even a kill -9 of it), never train as an orphan.
        arm_parent_death_signal()
    except RunLockError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0

    try:   # every rank writes here (DeepSpeed saves one shard per rank): refuse now, not at the first checkpoint
        check_writable(cfg.output_dir)
    except StorageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

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
        check_writable(os.path.join(cfg.output_dir, "checkpoints"))   # after the lock: a refused run writes nothing
        trainer = Trainer(cfg)
        try:
            trainer.fit()
        finally:
            trainer.close()
    except (DataError, EngineError, CheckpointError, PretrainedError, ConfigError, MetricsPortError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:   # a write refused later in the run (folder made read-only, permissions changed)
        if sentence_for(err) is None:
            raise
        print(f"error: {sentence_for(err)}", file=sys.stderr)
        return 2
    finally:
        lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
