"""Class folder names become labels (labels.txt, one per line; Triton answers 'score:index:label'): a name with a line
break, a ':', a path separator, a control character or bytes that are not UTF-8 is refused at listing time in one
sentence, before anything is trained or written."""
import os
import shutil
import subprocess

import pytest

from tests.conftest import PY, ROOT, SMOKE_CONFIG, make_imagefolder, subprocess_env
from train.config import DataConfig
from train.listing import DataError, list_dataset

BAD = [("line\nbreak", "a line break"), ("cr\rname", "a line break"), ("cat:dog", "a ':'"),
       ("back\\slash", "a path separator"), ("tab\tname", "a control character"),
       (b"caf\xe9".decode("utf-8", "surrogateescape"), "bytes that are not UTF-8")]


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("names") / "images", classes=2, counts=(2, 1, 1))


@pytest.mark.parametrize("name, says", BAD, ids=[s for _, s in BAD][:1] + [repr(n) for n, _ in BAD[1:]])
def test_a_class_name_that_would_shift_or_split_labels_is_refused(small_folder, tmp_path, name, says):
    root = tmp_path / "images"
    shutil.copytree(small_folder, root)
    for split in ("train", "val"):
        os.rename(os.path.join(root, split, "circle"), os.path.join(os.fsencode(root / split), os.fsencode(name)))
    with pytest.raises(DataError) as err:
        list_dataset(DataConfig(root=str(root)))
    msg = str(err.value)
    assert msg.startswith(f"Class folder {ascii(name)} in '{root / 'train'}' has {says} in its name")
    assert msg.endswith(".") and "\n" not in msg and "rename it" in msg


def test_python_m_train_refuses_it_in_one_sentence_and_writes_nothing(small_folder, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(small_folder, root)
    for split in ("train", "val", "test"):
        os.rename(root / split / "square", root / split / "a:b")
    out = tmp_path / "run"
    r = subprocess.run([PY, "-m", "train", "--config", str(SMOKE_CONFIG), "--set", f"data.root={root}",
                        "--set", f"output_dir={out}", "--set", "metrics.enabled=false"],
                       env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Class folder 'a:b'" in errors[0] and "a ':'" in errors[0], r.stderr[-2000:]
    assert not list(out.rglob("*.pt")) and not (out / "report.json").exists()


def test_ordinary_names_are_listed(small_folder):
    assert list_dataset(DataConfig(root=str(small_folder))).classes == ["circle", "square"]
