"""The training images, pyproject.toml, the rendered Kubernetes image and docs/cluster.md agree with the version
table (train/compat.yaml): one row per GPU generation. Each disagreement fails naming the file and the value."""
from __future__ import annotations

import fnmatch
import os
import re
import tomllib
import subprocess
import sys

import pytest
import torch

from launch.k8s import image_for
from launch.torchrun import REPO_ROOT
from train.compat import load_table, train_images

TABLE = load_table()
ROWS = train_images()


def dockerfile_args(path) -> tuple[dict, str, str]:
    """(ARG defaults, the FROM image, the whole text) of a Dockerfile."""
    text = (REPO_ROOT / path).read_text()
    args = {m.group(1): m.group(2).strip('"') for m in re.finditer(r"^ARG (\w+)=(.*)$", text, re.M)}
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    return args, base, text


def arch_check_command(text: str) -> str:
    """The `RUN python -c "..."` that asserts the torch arch list, joined from its continuation lines."""
    m = re.search(r'^RUN (python -c "import os, torch;.*?")\n', text.replace("\\\n", ""), re.M | re.S)
    assert m, "no torch arch-list check in the Dockerfile"
    return m.group(1)


@pytest.mark.parametrize("row", sorted(ROWS))
def test_dockerfile_matches_its_table_row(row):
    r = ROWS[row]
    path = r["dockerfile"]
    args, base, _ = dockerfile_args(path)
    expected = {"TORCH_INDEX": r["torch_index"], "TORCH": TABLE["torch"], "TORCHVISION": TABLE["torchvision"],
                "DALI_PACKAGE": r["dali_package"], "DALI": TABLE["dali"], "DEEPSPEED": TABLE["deepspeed"],
                "TARGET_ARCHS": " ".join(r["archs"])}
    for key, value in expected.items():
        assert args.get(key) == value, f"{path}: ARG {key}={args.get(key)!r}, train/compat.yaml says {value!r}"
    assert r["torch_index"].rstrip("/").endswith("/" + r["tag_suffix"]), f"train/compat.yaml {row}: index vs tag_suffix"
    m = re.fullmatch(r"nvidia/cuda:(\d+\.\d+)\.\d+-base-ubuntu\d+\.\d+", base)
    assert m and m.group(1) == r["cuda"], f"{path}: FROM {base}, train/compat.yaml says CUDA {r['cuda']}"
    assert (REPO_ROOT / f"{path}.dockerignore").is_file(), f"{path}.dockerignore is missing"


def _covered(targets, have) -> list[str]:
    caps = [(int(a[3:-1]), int(a[-1])) for a in have if a.startswith("sm_")]
    return [t for t in targets if not any(M == int(t.split(".")[0]) and m <= int(t.split(".")[1]) for M, m in caps)]


@pytest.mark.parametrize("row", sorted(ROWS))
def test_the_image_build_arch_assertion_runs_and_can_fail(row):
    """The Dockerfile's own check, run against this venv's torch: it passes exactly when this torch build covers
    the row's archs (the cu130 wheel here covers Turing+ and not Volta, so the Volta check must fail)."""
    _, _, text = dockerfile_args(ROWS[row]["dockerfile"])
    cmd = arch_check_command(text)
    r = subprocess.run(["bash", "-c", cmd.replace("python -c", f"{sys.executable} -c", 1)], capture_output=True, text=True,
                       env={**os.environ, "TARGET_ARCHS": " ".join(ROWS[row]["archs"])}, timeout=120)
    missing = _covered(ROWS[row]["archs"], torch.cuda.get_arch_list())
    if missing:
        assert r.returncode != 0 and str(missing) in r.stderr and "use the image built for that GPU generation" in r.stderr, r.stderr
    else:
        assert r.returncode == 0, r.stderr
    if torch.version.cuda and torch.version.cuda.startswith("13."):
        assert bool(missing) == (row == "volta"), (row, torch.cuda.get_arch_list())


def test_constraints_pin_the_table_and_pyproject_pins_no_torch():
    """The tested set (constraints.txt, what setup_env, the Makefile and the images install with) is the table's; the
    package itself requires no exact torch, so a site's CUDA build of torch is never replaced by `pip install`."""
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", (REPO_ROOT / "constraints.txt").read_text(), re.M))
    for pkg, key in (("torch", "torch"), ("torchvision", "torchvision"), ("deepspeed", "deepspeed")):
        assert pins.get(pkg) == TABLE[key], f"constraints.txt: {pkg}=={pins.get(pkg)}, train/compat.yaml says {TABLE[key]}"
    for dali_package in {r["dali_package"] for r in ROWS.values()}:
        assert pins.get(dali_package) == TABLE["dali"], f"constraints.txt: {dali_package}=={pins.get(dali_package)}, train/compat.yaml says {TABLE['dali']}"
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    exact = [d for d in deps if re.match(r"(torch|torchvision)\b", d) and "==" in d]
    assert not exact, f"pyproject.toml pins {exact}: move exact versions to constraints.txt"


@pytest.mark.parametrize("row", sorted(ROWS))
def test_launch_k8s_renders_the_row_image_for_each_of_its_archs(row):
    r = ROWS[row]
    for arch in r["archs"]:
        image, chosen = image_for("registry.example.com/seresnet-stack/train:0.1.0", arch)
        assert chosen == row and image == f"registry.example.com/seresnet-stack/train:0.1.0-{r['tag_suffix']}", \
            f"launch/k8s.py: compute capability {arch} renders {image}, train/compat.yaml says {row} ({r['tag_suffix']})"
    _, _, text = dockerfile_args(r["dockerfile"])
    assert f":0.1.0-{r['tag_suffix']}" in text, f"{r['dockerfile']}: the build command does not tag -{r['tag_suffix']}"


def driver_floor(r: dict) -> str:
    """The driver cell of docs/cluster.md's image table, from the row: the native floor and the forward-compatible
    branches the image's base admits below it."""
    branches = r.get("compat_driver_branches") or []
    return f">= {r['min_driver']}" + (f", or a {' / '.join(branches)} branch (forward compatibility)" if branches else "")


@pytest.mark.parametrize("row", sorted(ROWS))
def test_driver_floor_is_the_one_the_cuda_base_admits(row):
    """A CUDA X.Y base image admits a driver that supports X.Y itself: CUDA 12.6 needs >= 560.28.03 and 13.0 needs
    >= 580.65.06 (CUDA toolkit release notes, table 3); lower branches only through forward compatibility, listed."""
    r = ROWS[row]
    native = {"12.6": "560.28.03", "13.0": "580.65.06"}[r["cuda"]]
    assert r["min_driver"] == native, f"train/compat.yaml {row}: min_driver {r['min_driver']}, CUDA {r['cuda']} needs {native}"
    assert all(int(b) < int(native.split(".")[0]) for b in r.get("compat_driver_branches") or [])
    _, _, text = dockerfile_args(r["dockerfile"])
    for branch in r.get("compat_driver_branches") or []:
        assert f"{branch}" in text, f"{r['dockerfile']}: does not name the {branch} branch its base admits"
    assert "525.60.13" not in text, f"{r['dockerfile']}: 525.60.13 is refused by the CUDA 12.6 base (not a floor)"


def test_pyproject_dali_extra_is_the_extras_row_wheel():
    """`pip install '.[dali]'` next to PyPI's torch (the cu130 build) gets the DALI wheel of the same CUDA major."""
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    row = ROWS[TABLE["extras_row"]]
    assert extras["dali"] == [f"{row['dali_package']}=={TABLE['dali']}"], \
        f"pyproject.toml: dali extra {extras['dali']}, train/compat.yaml extras_row {TABLE['extras_row']} says {row['dali_package']}"
    if torch.version.cuda:   # this venv's torch is the PyPI build: the row it follows
        assert torch.version.cuda.split(".")[0] == row["cuda"].split(".")[0], (torch.version.cuda, row["cuda"])


def test_docs_cluster_image_table_matches():
    text = (REPO_ROOT / "docs" / "cluster.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and cells[1].startswith("k8s/images/train"):
            rows[cells[0]] = cells
    assert set(rows) == set(ROWS), f"docs/cluster.md: image table rows {sorted(rows)}, train/compat.yaml has {sorted(ROWS)}"
    for row, r in ROWS.items():
        name, dockerfile, suffix, archs, cuda, driver = rows[row][:6]
        want = (r["dockerfile"], r["tag_suffix"], ", ".join(r["archs"]), r["cuda"], driver_floor(r))
        got = (dockerfile, suffix, archs, cuda, driver)
        assert got == want, f"docs/cluster.md: image row {row} says {got}, train/compat.yaml says {want}"
    assert f"torch {TABLE['torch']}" in text, f"docs/cluster.md: does not name torch {TABLE['torch']}"


@pytest.mark.parametrize("dockerfile", sorted(p.name for p in (REPO_ROOT / "k8s" / "images").glob("*.Dockerfile")))
def test_every_copy_source_is_in_the_build_context(dockerfile):
    """BuildKit sends only what <Dockerfile>.dockerignore lets through: a COPY of a path it drops fails the build."""
    path = REPO_ROOT / "k8s" / "images" / dockerfile
    rules = [line.strip() for line in path.with_name(path.name + ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    for line in path.read_text().splitlines():
        if not line.startswith("COPY ") or "--from=" in line:
            continue
        for src in [w for w in line.split()[1:-1] if not w.startswith("--")]:
            excluded = False
            for rule in rules:   # later rules win, as in .dockerignore
                neg = rule.startswith("!")
                pattern = rule.lstrip("!")
                if fnmatch.fnmatch(src, pattern) or src.startswith(pattern.rstrip("/") + "/"):
                    excluded = not neg
            assert not excluded, f"{dockerfile}: COPY {src} but {dockerfile}.dockerignore leaves it out of the context"
            assert src.startswith("runs/") or (REPO_ROOT / src).exists(), f"{dockerfile}: COPY {src}, not in the repository"
