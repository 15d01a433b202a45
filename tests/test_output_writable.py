"""An output folder this process may not write (NFS ignoring fsGroup: the folder belongs to another uid) stops
`python -m train` at start in one sentence naming the folder and the fix, exit code 2, no traceback."""
import os
import subprocess

import pytest

from tests.conftest import PY, ROOT, SMOKE_CONFIG, subprocess_env

def _without_root_override(cmd: list[str]) -> list[str]:
    """As root, run ``cmd`` without CAP_DAC_OVERRIDE, so the folder's mode bits hold for it as they do for a pod's
    non-root uid (the interpreter under /root stays reachable: root still owns it)."""
    if os.geteuid() == 0:
        return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]
    return cmd


@pytest.mark.parametrize("which", ["output_dir", "checkpoints"])
def test_unwritable_output_folder_is_one_sentence_and_exit_2(tmp_path, tiny_imagefolder, which):
    out = tmp_path / "shared" / "run"
    (out / "checkpoints").mkdir(parents=True)
    locked = out if which == "output_dir" else out / "checkpoints"
    os.chmod(locked, 0o555)   # owned by the job's uid, but not writable
    cmd = _without_root_override([PY, "-m", "train", "--config", str(SMOKE_CONFIG), "--set", f"data.root={tiny_imagefolder}",
                         "--set", f"output_dir={out}", "--set", "metrics.enabled=false"])
    env = subprocess_env(HOME=str(tmp_path), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    try:
        r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(locked, 0o755)
    uid, gid = os.geteuid(), os.getgid()
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: Cannot write to '{locked}' (Permission denied) as uid {uid} (gid {gid}): "
                      f"run the job as the uid that owns the folder (securityContext.runAsUser; on NFS fsGroup does "
                      f"not change ownership), or make it writable for uid {uid} on the server (chown/chmod), or set "
                      f"output_dir to a writable path."], r.stderr[-3000:]
