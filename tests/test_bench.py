"""`make bench` (scripts/bench.py): its quickest real mode writes bench.json with the preprocess figures, and a quick
run is marked as such in BENCHMARKS.md. (The full serving pairs need an SE-ResNet50 export, quantization and a
tritonserver: minutes, so they run in `make bench`, not here.)"""
from __future__ import annotations

import json
import subprocess
import sys

from scripts.bench import render_markdown
from tests.conftest import ROOT, subprocess_env


def test_quick_preprocess_bench_writes_figures_by_format_and_size(tmp_path):
    before = (ROOT / "BENCHMARKS.md").read_bytes() if (ROOT / "BENCHMARKS.md").exists() else None
    proc = subprocess.run([sys.executable, "-m", "scripts.bench", "--quick", "--only", "preprocess", "--no-markdown",
                           "--out", str(tmp_path)], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["quick"] is True and result["machine"]["cores"] >= 1
    fig = result["sections"]["serving"]
    for fmt in ("jpeg", "png"):
        for size in ("small", "large"):
            assert 0 < fig[f"preprocess_ms_{fmt}_{size}"] < 1000
            assert fig[f"preprocess_bytes_{fmt}_{size}"] > 0
            # side by side with the one-pass resize (full decode) on the same bytes
            assert fig[f"preprocess_{fmt}_{size}_reduce_on_load_vs_one_pass_speedup"] > 0
        # 96 px inputs are under 3 x the demo's 32 px target: no reduction, the same pixels; 1000 px ones are reduced
        assert fig[f"preprocess_{fmt}_small_max_grey_level_diff"] == 0
        assert 0 < fig[f"preprocess_{fmt}_large_max_grey_level_diff"] <= 20
        # A 1000 px photo costs more to decode and downscale than a 96 px one.
        assert fig[f"preprocess_ms_{fmt}_large"] > fig[f"preprocess_ms_{fmt}_small"]
    assert ((ROOT / "BENCHMARKS.md").read_bytes() if before is not None else None) == before  # --no-markdown


def test_markdown_marks_quick_runs_and_bolds_every_ratio():
    result = {"machine": {"date": "d", "cores": 2, "cpu": "c", "python": "3.11", "load_average_at_start": 0.1},
              "quick": True, "seconds": 1.0, "command": "python -m scripts.bench --quick",
              "sections": {"serving": {"int8_vs_fp32_size_ratio": 0.26, "int8_vs_fp32_b16_speedup": 1.5, "x_ms": 3.0}}}
    md = render_markdown(result)
    assert "QUICK RUN" in md and "`python -m scripts.bench --quick`" in md
    assert "| `int8_vs_fp32_size_ratio` | **0.26** |" in md and "| `int8_vs_fp32_b16_speedup` | **1.5** |" in md
    assert "| `x_ms` | 3.0 |" in md
    assert "QUICK RUN" not in render_markdown({**result, "quick": False})
