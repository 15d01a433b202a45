"""Regenerate the README's reference sections (config keys from the typed config, CLI --help texts) so they cannot drift.

`python -m scripts.readme` rewrites README.md in place; `--check` exits 1 when it is out of date (a test runs it).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLIS = [
    ("python -m train --help", "train.__main__", []),
    ("python -m launch --help", "launch.__main__", ["--help"]),
    ("python -m launch local --help", "launch.__main__", ["local", "--help"]),
    ("python -m launch multinode --help", "launch.__main__", ["multinode", "--help"]),
    ("python -m launch k8s --help", "launch.__main__", ["k8s", "--help"]),
    ("python -m launch preflight --help", "launch.__main__", ["preflight", "--help"]),
    ("python -m serve --help", "serve.__main__", ["--help"]),
    ("python -m serve export --help", "serve.__main__", ["export", "--help"]),
    ("python -m serve repository --help", "serve.__main__", ["repository", "--help"]),
    ("python -m serve up --help", "serve.__main__", ["up", "--help"]),
    ("python -m serve classify --help", "serve.__main__", ["classify", "--help"]),
    ("python -m serve trt --help", "serve.__main__", ["trt", "--help"]),
    ("python -m serve evaluate --help", "serve.__main__", ["evaluate", "--help"]),
    ("python -m serve quantize --help", "serve.__main__", ["quantize", "--help"]),
    ("python -m scripts.demo --help", "scripts.demo", ["--help"]),
    ("python -m scripts.bench --help", "scripts.bench", ["--help"]),
]


def _help_text(module: str, args: list[str]) -> str:
    import importlib
    import os

    os.environ["COLUMNS"] = "100"
    mod = importlib.import_module(module)
    buf = io.StringIO()
    if module == "train.__main__":
        return mod.build_parser().format_help()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        mod.main(args)
    return buf.getvalue()


def cli_reference() -> str:
    parts = []
    for title, module, args in CLIS:
        parts.append(f"<details><summary><code>{title}</code></summary>\n\n```text\n{_help_text(module, args).rstrip()}\n```\n</details>\n")
    return "\n".join(parts)


def config_reference() -> str:
    from train.config import config_reference_markdown
    return config_reference_markdown()


SECTIONS = {"CONFIG REFERENCE": config_reference, "CLI REFERENCE": cli_reference}


def render(text: str) -> str:
    for name, fn in SECTIONS.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md lacks the <!-- BEGIN {name} --> / <!-- END {name} --> markers")
        text = pattern.sub(lambda m: m.group(1) + fn() + m.group(2), text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.readme", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date instead of rewriting it")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    current = README.read_text()
    new = render(current)
    if args.check:
        if new != current:
            print("README.md reference sections are out of date; run: make readme", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
