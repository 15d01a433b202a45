"""Regenerate the generated reference pages (docs/config.md from the typed config, docs/cli.md from the commands'
own --help) so they cannot drift.

`python -m scripts.readme` rewrites them in place; `--check` exits 1 when one is out of date (a test runs it).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# (title, module whose main(argv) prints the help, argv)
CLIS = [("seresnet --help", "seresnet.cli", ["--help"])] + [
    (f"seresnet {' '.join(words)} --help", "seresnet.cli", [*words, "--help"])
    for words in (["train"], ["evaluate"], ["preflight"], ["serve"], ["serve", "export"], ["serve", "quantize"],
                  ["serve", "repository"], ["serve", "up"], ["serve", "classify"], ["serve", "evaluate"], ["serve", "trt"],
                  ["launch"], ["launch", "local"], ["launch", "multinode"], ["launch", "k8s"])
] + [
    ("python -m scripts.demo --help", "scripts.demo", ["--help"]),
    ("python -m scripts.bench --help", "scripts.bench", ["--help"]),
]


def _help_text(module: str, args: list[str]) -> str:
    import importlib
    import os

    os.environ["COLUMNS"] = "100"
    mod = importlib.import_module(module)
    buf = io.StringIO()
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


SECTIONS = {"CONFIG REFERENCE": (DOCS / "config.md", config_reference), "CLI REFERENCE": (DOCS / "cli.md", cli_reference)}


def render(name: str, text: str) -> str:
    path, fn = SECTIONS[name]
    pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path.relative_to(ROOT)} lacks the <!-- BEGIN {name} --> / <!-- END {name} --> markers")
    return pattern.sub(lambda m: m.group(1) + fn() + m.group(2), text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.readme", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a generated page is out of date instead of rewriting it")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    stale = []
    for name, (path, _) in SECTIONS.items():
        current = path.read_text()
        new = render(name, current)
        if new != current:
            stale.append(str(path.relative_to(ROOT)))
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"{', '.join(stale)} out of date; run: make readme", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
