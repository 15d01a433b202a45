"""Config: typed loading, overrides, and the clear errors the CLI promises."""
import subprocess

import pytest

from tests.conftest import PY, ROOT, SMOKE_CONFIG, subprocess_env
from train.config import ConfigError, config_reference_markdown, load_config


def test_overrides_are_typed_and_validated():
    cfg = load_config(SMOKE_CONFIG, ["train.epochs=2.5", "data.backend=dali", "optim.name=sgd"])
    assert cfg.train.epochs == 2.5 and cfg.data.backend == "dali" and cfg.optim.name == "sgd"


@pytest.mark.parametrize("override, message", [
    ("model.depth=101", "Unknown config key 'model.depth'"),
    ("data.batch_size=0", "Bad value for 'data.batch_size'"),
    ("engine=horovod", "Bad value for 'engine'"),
    ("data.image_size=300", "data.eval_resize (256) must be >= data.image_size (300)"),
    ("novalue", "--set expects key=value"),
])
def test_bad_config_is_one_clear_sentence(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")


def _run_cli(*args):
    return subprocess.run([PY, "-m", "train", *args], capture_output=True, text=True, env=subprocess_env(), cwd=ROOT,
                          timeout=120)


def test_cli_bad_key_exits_2_without_traceback():
    r = _run_cli("--config", str(SMOKE_CONFIG), "--set", "optim.lrate=0.1")
    assert r.returncode == 2
    assert "error: Unknown config key 'optim.lrate'" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_missing_data_folder(tmp_path):
    r = _run_cli("--config", str(SMOKE_CONFIG), "--set", f"data.root={tmp_path}/missing", "--set", f"output_dir={tmp_path}/o")
    assert r.returncode == 2
    assert f"error: Data folder '{tmp_path}/missing' does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_print_config_round_trips(tmp_path):
    r = _run_cli("--config", str(SMOKE_CONFIG), "--set", "train.epochs=3", "--print-config")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "resolved.yaml"
    out.write_text(r.stdout)
    assert load_config(out).train.epochs == 3


def test_config_reference_lists_every_key():
    ref = config_reference_markdown()
    for key in ("`data.root`", "`output_dir`", "`schedule.T_0`", "`deepspeed.zero_stage`", "`serve.max_batch_size`"):
        assert key in ref


def test_busy_metrics_port_is_one_sentence(tiny_imagefolder, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _run_cli("--config", str(SMOKE_CONFIG), "--set", f"data.root={tiny_imagefolder}",
                     "--set", f"output_dir={tmp_path}/o", "--set", f"metrics.port={port}")
    assert r.returncode == 2
    assert f"error: Cannot serve training metrics on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("override, says", [
    ("data.std=[0.2,0,0.2]", "data.std must be > 0"),
    ("data.batch_size=0", "data.batch_size"),
    ("serve.preferred_batch_sizes=[8,64]", "preferred_batch_sizes [64]"),
    ("deepspeed.extra={train_micro_batch_size_per_gpu: 4}", "deepspeed.extra may not set train_micro_batch_size_per_gpu"),
    ("deepspeed.extra={bf16: {enabled: true}}", "deepspeed.extra may not set bf16"),
    ("data.progressive_min_size=300", "progressive_min_size"),
    ("optim.lr_scaling=cubic", "optim.lr_scaling"),
])
def test_values_are_range_checked_in_one_sentence(override, says):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert says in str(err.value) and "\n" not in str(err.value)


def test_yaml_on_off_for_channels_last():
    assert load_config(None, ["train.channels_last=on"]).train.channels_last == "on"
    assert load_config(None, ["train.channels_last=off"]).train.channels_last == "off"


def test_deepspeed_extra_may_add_other_keys():
    cfg = load_config(None, ["deepspeed.extra={gradient_clipping: 1.0}"])
    assert cfg.deepspeed.extra == {"gradient_clipping": 1.0}
