"""The run directory's layout: `iteration-<k>/` folders, a `COMPLETE` marker once an iteration is whole,
`metrics.jsonl` with one row per complete iteration, and a checksum manifest beside each DeepSpeed
checkpoint (`deepspeed/iteration-<k>/MANIFEST.sha256`) so a resume unpickles only what the run wrote."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

MANIFEST = "MANIFEST.sha256"


class CheckpointError(ValueError):
    """A checkpoint a resume cannot use; the message names the folder and what is wrong."""


def json_safe(record: dict) -> dict:
    """Non-finite floats become null: metrics.jsonl stays JSON that any parser reads."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else
            [None if isinstance(x, float) and not math.isfinite(x) else x for x in v] if isinstance(v, list) else v
            for k, v in record.items()}


def last_complete_iteration(run_dir: Path) -> int:
    done = [int(p.parent.name.split("-")[1]) for p in run_dir.glob("iteration-*/COMPLETE")]
    return max(done, default=0)


def deepspeed_dir(run_dir: Path, iteration: int) -> Path:
    return run_dir / "deepspeed" / f"iteration-{iteration}"


def hf_dir(run_dir: Path, iteration: int) -> Path:
    return run_dir / f"iteration-{iteration}" / "hf"


def resume_source(run_dir: Path, iteration: int) -> str | None:
    """What a resume after `iteration` loads: "deepspeed" (weights and optimiser), "hf" (weights only) or None."""
    if deepspeed_dir(run_dir, iteration).is_dir():
        return "deepspeed"
    if (hf_dir(run_dir, iteration) / "config.json").is_file():
        return "hf"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    """sha256 of every file in a checkpoint folder, in `sha256sum` format (check by hand with `sha256sum -c`)."""
    lines = [f"{_sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in _files(folder)]
    (folder / MANIFEST).write_text("".join(lines))


def verify_manifest(folder: Path) -> None:
    """Raise CheckpointError unless the folder holds exactly the files its manifest lists, unchanged."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST}, so nothing shows the run wrote these files; "
                              f"refusing to unpickle them")
    expected = {}
    for line in manifest.read_text().splitlines():
        digest, _, name = line.partition("  ")
        expected[name] = digest
    found = {p.relative_to(folder).as_posix(): p for p in _files(folder)}
    if set(found) != set(expected):
        extra, missing = sorted(set(found) - set(expected)), sorted(set(expected) - set(found))
        raise CheckpointError(f"{folder}: files differ from {MANIFEST} (not in it: {extra}; missing: {missing})")
    changed = sorted(name for name, path in found.items() if _sha256(path) != expected[name])
    if changed:
        raise CheckpointError(f"{folder}: {changed} changed since the run wrote them (sha256 differs from {MANIFEST})")


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
    """Rank 0, after every rank saved: the checkpoint's manifest, the probe for a resume's re-sync, the metrics
    row, then the marker."""
    if deepspeed_dir(run_dir, iteration).is_dir():
        write_manifest(deepspeed_dir(run_dir, iteration))
    it_dir = run_dir / f"iteration-{iteration}"
    (it_dir / "probe.json").write_text(json.dumps(list(probe)))
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
    (it_dir / "COMPLETE").write_text("ok\n")
