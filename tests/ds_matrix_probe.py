"""Run under torchrun by the tests: one process group trains every (ZeRO stage, optimizer) pair in turn with the real
Trainer and DeepSpeed (one start-up instead of six), dumping each rank's parameters as trained."""
import sys
from pathlib import Path

import torch

from train.config import load_config
from train.distributed import shutdown
from train.engine import Trainer, setup_logging

if __name__ == "__main__":
    setup_logging()
    config, base, combos = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(",")
    for combo in combos:
        stage, optim = combo.split("-")
        out = base / combo
        cfg = load_config(config, sys.argv[4:] + [f"output_dir={out}", f"deepspeed.zero_stage={stage}",
                                                  f"optim.name={optim}"])
        trainer = Trainer(cfg)
        trainer.fit()
        state = {k: v.detach().cpu() for k, v in trainer.backend.module.state_dict().items()}
        torch.save(state, out / f"params-rank{trainer.dinfo.rank}.pt")
    shutdown()
