"""The run directory's layout: `iteration-<k>/` folders, a `COMPLETE` marker once an iteration is whole,
`metrics.jsonl` with one row per complete iteration."""
from __future__ import annotations

import json
import math
from pathlib import Path


def json_safe(record: dict) -> dict:
    """Non-finite floats become null: metrics.jsonl stays JSON that any parser reads."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else
            [None if isinstance(x, float) and not math.isfinite(x) else x for x in v] if isinstance(v, list) else v
            for k, v in record.items()}


def last_complete_iteration(run_dir: Path) -> int:
    done = [int(p.parent.name.split("-")[1]) for p in run_dir.glob("iteration-*/COMPLETE")]
    return max(done, default=0)


def mark_stopped(run_dir: Path, attempt: str, message: str) -> None:
    """Rank 0: why the run stopped in order (a StopRun), for the driver to report."""
    (run_dir / "STOPPED").write_text(json.dumps({"attempt": attempt, "message": message}) + "\n")


def stop_message(run_dir: Path, attempt: str) -> str | None:
    """The message of a stop of this driver's run (`attempt`), if it stopped."""
    path = run_dir / "STOPPED"
    if not path.is_file():
        return None
    note = json.loads(path.read_text())
    return note["message"] if note["attempt"] == attempt else None


def mark_complete(run_dir: Path, iteration: int, record: dict, probe: tuple[list[int], list[int]]) -> None:
    """Rank 0, after every rank saved: the probe for a resume's re-sync, the metrics row, then the marker."""
    it_dir = run_dir / f"iteration-{iteration}"
    (it_dir / "probe.json").write_text(json.dumps(list(probe)))
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
    (it_dir / "COMPLETE").write_text("ok\n")
