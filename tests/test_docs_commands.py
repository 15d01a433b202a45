"""Every command in README.md and docs/*.md is parsed by the real parsers: `seresnet` and `python -m train|serve|launch`
lines by the `seresnet` argparse tree (trainer arguments after `--` included), `python -m scripts.X` modules must
exist and answer --help, make targets must exist, files named to bash/docker/kubectl must exist. A flag the docs
name that the command does not have fails here with the file and the line. (The README's own lines are also run
end to end in tests/test_readme.py.)"""
from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from seresnet.cli import build_parser
from tests.conftest import PY, ROOT, subprocess_env

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Programs the docs may name whose arguments are not ours to parse (cluster and system tools).
FOREIGN = {"kubectl", "docker", "srun", "head", "helm", "curl", "pip", "git", "cd", "export", "time", "sbatch",
           "scontrol", "nvidia-smi", "ulimit", "tritonserver", "promtool", "perf_analyzer", "trtexec", "cat", "ls",
           "mkdir", "source", "echo", "kill", "wait", "sleep", "grep", "jq", "watch", "aws", "gsutil", "tar", "sha256sum"}
PY_NAMES = {"python", "python3", ".venv/bin/python"}
SERESNET = {"seresnet", ".venv/bin/seresnet"}
OPERATORS = {"&&", "||", ";", "|", "&", ";;"}


def doc_commands() -> list[tuple[str, str]]:
    """(file name, command line) for every line of every bash/sh/console block, continuation lines joined."""
    out = []
    for path in DOCS:
        for block in re.findall(r"```(?:bash|sh|console|shell)\n(.*?)```", path.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"^\$ ", "", line.split(" #")[0].strip())
                if line and not line.startswith("#"):
                    out.append((path.relative_to(ROOT).as_posix(), line))
    return out


def _parse(argv: list[str]) -> str:
    """'' when the seresnet parser accepts argv (and the trainer's parser what follows `--`), else its error."""
    own, trailing = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, None)
    for words in ([own] if trailing is None else [own, ["train", *trailing]]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                build_parser().parse_args(words)
            except SystemExit as e:
                if e.code:
                    return " ".join(err.getvalue().split())
    return ""


def simple_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line: $(...) and $VARS made into placeholders, split at && || ; | &."""
    line = re.sub(r"\$\([^()]*\)", "X", line)
    line = re.sub(r"\$\{?\w+\}?", "X", line)
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    out, cur = [], []
    for tok in lex:
        if tok in OPERATORS:
            out.append(cur)
            cur = []
        else:
            cur.append(tok)
    out.append(cur)
    return [c for c in out if c]


def problems(words: list[str], makefile: str, modules: set) -> list[str]:
    """What is wrong with one simple command (empty: nothing), recursing into `bash -c` and srun."""
    while words and re.match(r"^[A-Za-z_]+=", words[0]):
        words = words[1:]
    if not words:
        return []
    prog, args = words[0], words[1:]
    if prog in SERESNET:
        return [p for p in [_parse(args)] if p]
    if prog in PY_NAMES and args[:1] == ["-m"] and len(args) > 1:
        module, rest = args[1], args[2:]
        if module in ("train", "serve", "launch"):
            argv = rest if module == "launch" and rest[:1] == ["preflight"] else [module, *rest]
            return [p for p in [_parse(argv)] if p]
        modules.add(module)
        if module.startswith("scripts.") and not (ROOT / (module.replace(".", "/") + ".py")).is_file():
            return [f"no module {module}"]
        return []
    if prog == "bash":
        if args[:1] == ["-c"] and len(args) > 1:
            return [p for c in simple_commands(args[1]) for p in problems(c, makefile, modules)]
        return [] if args and (ROOT / args[0]).is_file() else [f"no script {args[:1]}"]
    if prog == "srun":
        return problems(args[next((i for i, a in enumerate(args) if not a.startswith("-")), len(args)):], makefile, modules)
    if prog == "make":
        return [f"no make target '{t}'" for t in args if "=" not in t and not re.search(rf"^{re.escape(t)}:", makefile, re.M)]
    if prog == "docker" and "-f" in args:
        f = args[args.index("-f") + 1]
        return [] if (ROOT / f).is_file() else [f"no {f}"]
    if prog == "kubectl" and "-k" in args:
        target = args[args.index("-k") + 1]
        return [f"no kustomization in {target}"] if target.startswith("k8s/") and not (ROOT / target / "kustomization.yaml").is_file() else []
    if prog in FOREIGN:
        return []
    return [f"runs '{prog}', which this test does not know: parse it here or add it to FOREIGN"]


COMMANDS = doc_commands()
MODULES: set = set()


def test_the_docs_have_commands_to_check():
    files = {f for f, _ in COMMANDS}
    assert {"README.md", "docs/serving.md", "docs/cluster.md", "docs/training.md"} <= files, files
    ours = [c for _, c in COMMANDS if "seresnet " in c or re.search(r"-m (train|serve|launch) ", c)]
    assert len(ours) >= 20


@pytest.mark.parametrize("where,line", COMMANDS, ids=[f"{f}:{i}" for i, (f, _) in enumerate(COMMANDS)])
def test_every_documented_command_parses(where, line):
    makefile = (ROOT / "Makefile").read_text()
    found = [p for c in simple_commands(line) for p in problems(c, makefile, MODULES)]
    assert not found, f"{where}: `{line}`: {'; '.join(found)}"


def test_documented_modules_answer_help():
    modules = set()
    for _, line in COMMANDS:
        for c in simple_commands(line):
            problems(c, "", modules)
    modules -= {"pytest"}
    assert modules
    for module in sorted(modules):
        r = subprocess.run([PY, "-m", module, "--help"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and "usage" in r.stdout.lower(), (module, r.stderr[-500:])
