"""Run under torchrun by tests/test_nonfinite.py: the real Trainer's loop over synthetic batches where only rank 1
meets a NaN batch; each rank dumps its parameters, its skip count and the steps it took."""
import sys
from pathlib import Path

import torch

from train.config import load_config
from train.engine import Trainer, setup_logging
from train.loop import train_one_epoch

if __name__ == "__main__":
    setup_logging()
    nan_at = int(sys.argv[1])
    cfg = load_config(sys.argv[2], sys.argv[3:])
    trainer = Trainer(cfg)
    rank = trainer.dinfo.rank
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.arange(4)) for _ in range(6)]
    if rank == 1:
        batches[nan_at] = (batches[nan_at][0] * float("nan"), batches[nan_at][1])
    trainer.backend.train()
    stats = train_one_epoch(trainer, batches, len(batches), 0, "probe")
    state = {k: v.detach().cpu() for k, v in trainer.backend.module.state_dict().items()
             if "running" not in k and "num_batches" not in k}
    torch.save({"params": state, "nan_skips": trainer.nan_skips, "steps": stats.steps,
                "optimizer_steps": sorted({int(s["step"]) for s in trainer.backend.optimizer.state.values()})},
               Path(cfg.output_dir) / f"nonfinite-rank{rank}.pt")
    trainer.close()
