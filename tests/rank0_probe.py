"""Run under torchrun by tests/test_rank0.py: the real Trainer, counting on each rank how often it asked for the
data set's listing (train.data.list_dataset, a fresh walk or the cached listing) and which split folders it walked
itself (train.listing._list_split, the one walk over a split's files), then dumping those and the rank's
parameters. With LAG_RANK set, that rank runs in its own mount namespace where output_dir/checkpoints is
hidden (an empty folder bound over it) until the rank logs that it waits for the checkpoint rank 0 verified: a
node whose view of shared storage lags rank 0's."""
import json
import os
import sys
from pathlib import Path

LAG = """mount --bind "$LAG_EMPTY" "$LAG_DIR" || exit 97
( for i in $(seq 900); do kill -0 $$ 2>/dev/null || exit 0
    grep -q "not visible here yet" "$LAG_LOG" 2>/dev/null && break; sleep 0.1; done
  sleep 0.5; umount "$LAG_DIR" ) &
exec "$PY" "$@" 2>>"$LAG_LOG"
"""

if __name__ == "__main__":
    if os.environ.get("LAG_RANK") == os.environ.get("RANK") and not os.environ.get("LAG_INSIDE"):
        os.environ.update(LAG_INSIDE="1", PY=sys.executable)
        os.execvp("unshare", ["unshare", "-rm", "bash", "-c", LAG, "lag", *sys.argv])

    import torch

    import train.data
    import train.listing
    from train.config import load_config
    from train.engine import Trainer, setup_logging

    listed = {"calls": 0, "walked": []}
    walk, entry = train.listing._list_split, train.data.list_dataset

    def walking(split_dir, split, classes):
        listed["walked"].append(split)
        return walk(split_dir, split, classes)

    def calling(*args, **kwargs):
        listed["calls"] += 1
        return entry(*args, **kwargs)

    train.listing._list_split, train.data.list_dataset = walking, calling
    setup_logging()
    cfg = load_config(sys.argv[1], sys.argv[2:])
    trainer = Trainer(cfg)
    trainer.fit()
    rank, out = trainer.dinfo.rank, Path(cfg.output_dir)
    with open(out / f"listed-rank{rank}.jsonl", "a") as f:
        f.write(json.dumps(listed) + "\n")
    torch.save({k: v.detach().cpu() for k, v in trainer.backend.module.state_dict().items()}, out / f"params-rank{rank}.pt")
    trainer.close()
