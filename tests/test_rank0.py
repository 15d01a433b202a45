"""Rank-0 decisions under a real torchrun (2 processes, gloo): only rank 0 lists the data folder, and a restart
reuses its cached listing instead of listing again; on resume only rank 0 reads and verifies the checkpoint, and a
rank whose view of output_dir lags (the checkpoint not visible to it yet, as on an NFS client) waits for the file
rank 0 verified and resumes to the same weights."""
import json
import subprocess

import pytest
import torch

from tests.conftest import PY, ROOT, SMOKE_CONFIG, subprocess_env

pytestmark = pytest.mark.slow
PROBE = ROOT / "tests" / "rank0_probe.py"


def _torchrun(out, data, *sets, env=None):
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(PROBE), str(SMOKE_CONFIG),
           f"data.root={data}", f"output_dir={out}", "metrics.port=0", "train.checkpoint_every_steps=2", *sets]
    return subprocess.run(cmd, env=subprocess_env(**(env or {})), cwd=ROOT, capture_output=True, text=True, timeout=400)


def _listed(out, rank) -> list[list[str]]:
    return [json.loads(line) for line in (out / f"listed-rank{rank}.jsonl").read_text().splitlines()]


def test_rank0_lists_once_and_a_lagging_rank_resumes_from_the_file_rank0_verified(tiny_imagefolder, tmp_path):
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -rm (user and mount namespaces) is not allowed here: cannot give one rank its own view")
    out = tmp_path / "run"
    first = _torchrun(out, tiny_imagefolder, "train.max_steps=2")
    assert first.returncode == 0, first.stderr[-4000:]
    assert _listed(out, 0) == [{"calls": 1, "walked": ["train", "val", "test"]}]
    assert _listed(out, 1) == [{"calls": 0, "walked": []}], "rank 1 listed the data itself"

    empty = tmp_path / "not-yet"
    empty.mkdir()
    log = tmp_path / "rank1.log"
    second = _torchrun(out, tiny_imagefolder, "train.max_steps=4",
                       env=dict(LAG_RANK="1", LAG_DIR=str(out / "checkpoints"), LAG_EMPTY=str(empty), LAG_LOG=str(log)))
    rank1 = log.read_text() if log.exists() else ""
    assert second.returncode == 0, second.stderr[-3000:] + "\nrank 1:\n" + rank1[-3000:]
    assert "not visible here yet; waiting" in rank1, "rank 1 was never without the checkpoint: the lag did not happen"
    resumed = [line for line in second.stderr.splitlines() if "resuming from" in line]
    assert resumed and "step 2 of 4" in resumed[0], resumed or second.stderr[-3000:]
    # the restart lists nothing: rank 0 reads its cached listing, rank 1 never lists
    assert _listed(out, 0)[1] == {"calls": 1, "walked": []} and _listed(out, 1)[1] == {"calls": 0, "walked": []}
    a, b = (torch.load(out / f"params-rank{r}.pt", weights_only=True) for r in (0, 1))
    for k, v in a.items():
        assert torch.equal(v, b[k]), k
