"""The algorithm's regression test: the demo's SAMI run, 2 iterations, raises adherence and the MI bound."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_two_sami_iterations_raise_adherence_and_mi_bound(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        # The demo's world and settings, smaller: 2 iterations of 128 queries seen 3 times (24 steps, half
        # the demo's, at twice its learning rate).
        [sys.executable, "-m", "pipelines.demo", "--skip-baselines", "--iterations", "2", "--out", str(out),
         "--eval-queries", "150", "data.queries_per_iteration=128", "schedule.steps_per_iteration=24",
         "optim.lr=3e-4"],
        cwd=REPO, capture_output=True, text=True, timeout=450, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())["models"]
    base, last = report["base"], report["sami-iter2"]
    print({name: {k: round(m[k], 3) for k in ("adherence", "mi_lower_bound", "win_rate_vs_base")} for name, m in report.items()})
    assert last["adherence"] > base["adherence"] + 0.04
    assert last["mi_lower_bound"] > base["mi_lower_bound"] + 0.02
    assert last["win_rate_vs_base"] > 0.5
    assert last["well_formed"] > 0.85
    assert {"adherence_heldout", "mean_length"} <= set(last)
    assert (out / "report.png").stat().st_size > 0 and "sami-iter2" in (out / "report.md").read_text()
