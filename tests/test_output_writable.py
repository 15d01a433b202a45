"""An output folder this process may not write (NFS ignoring fsGroup: the folder belongs to another uid) stops
`python -m train` at start in one sentence naming the folder and the fix, exit code 2, no traceback."""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import PY, ROOT, SMOKE_CONFIG, subprocess_env

NOBODY = 65534


def _as_other_uid(cmd: list[str]) -> list[str]:
    """Run ``cmd`` as a uid that does not own the folder: as root, drop to nobody (root would bypass the mode bits)."""
    if os.geteuid() == 0:
        return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
    return cmd


@pytest.mark.parametrize("which", ["output_dir", "checkpoints"])
def test_unwritable_output_folder_is_one_sentence_and_exit_2(tiny_imagefolder, which):
    tmp_path = Path(tempfile.mkdtemp(prefix="seresnet-unwritable-"))   # pytest's own tmp folders are 0700
    request_cleanup = shutil.rmtree
    out = tmp_path / "shared" / "run"
    (out / "checkpoints").mkdir(parents=True)
    for d in (tmp_path, tmp_path / "shared"):
        os.chmod(d, 0o755)
    locked = out if which == "output_dir" else out / "checkpoints"
    os.chmod(out, 0o777)
    os.chmod(locked, 0o555)   # owned by this test's uid, not writable by the job's
    cmd = _as_other_uid([PY, "-m", "train", "--config", str(SMOKE_CONFIG), "--set", f"data.root={tiny_imagefolder}",
                         "--set", f"output_dir={out}", "--set", "metrics.enabled=false"])
    env = subprocess_env(HOME=str(tmp_path), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    try:
        r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(locked, 0o755)
        request_cleanup(tmp_path, ignore_errors=True)
    uid = NOBODY if os.geteuid() == 0 else os.geteuid()
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: Cannot write to '{locked}' (Permission denied) as uid {uid} (gid {uid if os.geteuid() == 0 else os.getgid()}): "
                      f"run the job as the uid that owns the folder (securityContext.runAsUser; on NFS fsGroup does "
                      f"not change ownership), or make it writable for uid {uid} on the server (chown/chmod), or set "
                      f"output_dir to a writable path."], r.stderr[-3000:]
