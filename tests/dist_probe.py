"""Run under torchrun by the tests: train with the real Trainer, then dump this rank's parameters for comparison."""
import sys
from pathlib import Path

import torch

from train.config import load_config
from train.engine import Trainer, setup_logging

if __name__ == "__main__":
    setup_logging()
    cfg = load_config(sys.argv[1], sys.argv[2:])
    trainer = Trainer(cfg)
    trainer.fit()
    state = {k: v.detach().cpu() for k, v in trainer.backend.module.state_dict().items()}  # dtypes as trained
    torch.save(state, Path(cfg.output_dir) / f"params-rank{trainer.dinfo.rank}.pt")
    trainer.close()
