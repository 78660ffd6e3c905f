"""The run directory, all of it: `RunDir` is the one place that spells a path in it.

    <run>/config.yaml                      the run's settings (a resume with others keeps config.iteration-<k>.yaml)
    <run>/principles.yaml                  the principle library, written once, reused on resume
    <run>/heldout_queries.jsonl            the queries training never draws
    <run>/iteration-<k>/groups.parquet     the iteration's kept query groups (QueryGroup.record())
    <run>/iteration-<k>/batches/           the data plane's per-batch ledger while the iteration generates
    <run>/iteration-<k>/hf/                the HF export (safetensors and tokenizer) and its MANIFEST.sha256; under
                                           LoRA the adapter in PEFT format (adapter_config.json names the base)
    <run>/iteration-<k>/merged/            LoRA with model.lora.export_merged: base + adapter merged, an HF model
    <run>/iteration-<k>/probe.json         the probe (prompt ids, response ids) a resume re-syncs with
    <run>/iteration-<k>/COMPLETE           written last: the iteration is whole
    <run>/deepspeed/iteration-<k>/         the DeepSpeed checkpoint (tag iteration-<k>) and its MANIFEST.sha256
    <run>/metrics.jsonl                    one row per complete iteration
    <run>/console.jsonl                    learner rank 0's lines and progress for the driver (the first run's)
    <run>/job.log, <run>/error.log         the framework's output; the traceback of a failed run
    <run>/learner_starts                   one line per start of the learner group (the driver's attempt token)
    <run>/STOPPED                          why the run stopped in order
    <run>/LOCK                             held (flock) by the driver whose run owns the folder; names its pid
    <run>/ray_train/                       Ray Train's storage
    <run>/base_model/                      a built-in base model, copied from the driver's cache: what the learner
                                           and engine nodes load (they share the run folder, not the driver's disk)
    <run>/eval/                            `python -m evals.run --run <run>`'s results (its run.output_dir)
    <run>/tracking.json                    the experiment trackers' run ids (a resume continues them) and the last
                                           iteration each has logged (sami/tracking.py)
    <run>/tensorboard/                     TensorBoard's event files (tracking.tensorboard.log_dir's default)
    <run>/mlflow.db, <run>/mlartifacts/    MLflow's default store and its artifacts (tracking.mlflow.tracking_uri unset)
    <run>/wandb/                           W&B's local run files

The checksum manifest in each DeepSpeed checkpoint and HF export, written once the iteration is saved, shows that
nothing was truncated or lost since. It is no signature (whoever can write the folder can rewrite it): what keeps a
planted pickle from running is that the states load weights-only (docs/ARCHITECTURE.md, "Checkpoints a resume
trusts"); `verify_checkpoint` refuses such a file before Ray starts.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from sami.config import ConfigError
from sami.jsonl import read_jsonl

MANIFEST = "MANIFEST.sha256"
# Everything a DeepSpeed 0.19.8 checkpoint pickles besides tensors and plain containers (ZeRO's optimiser state;
# read from its saves under ZeRO 0-3): the learner unpickles weights-only with these allowed, and nothing else.
DEEPSPEED_PICKLED_CLASSES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                             "deepspeed.runtime.zero.config.ZeroStageEnum",
                             "deepspeed.utils.tensor_fragment.fragment_address")


class CheckpointError(ValueError):
    """A checkpoint a resume cannot use; the message names the folder and what is wrong."""


class RunDirInUse(RuntimeError):
    """Another live process owns the run folder; the message names the folder and that process."""


def json_safe(record: dict) -> dict:
    """Non-finite floats become null: metrics.jsonl stays JSON that any parser reads."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else
            [None if isinstance(x, float) and not math.isfinite(x) else x for x in v] if isinstance(v, list) else v
            for k, v in record.items()}


def append_line(path: Path, line: str) -> None:
    """Append `line` and its newline whole or not at all: a write cut short (a full disk) is undone before the error
    is raised, so a reader of metrics.jsonl or console.jsonl never meets half a line. One writer per file."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
        except OSError as e:
            written, error = 0, e.errno
        else:
            error = errno.ENOSPC if written < len(data) else None
        if error is not None:
            os.ftruncate(fd, size)
            raise OSError(error, os.strerror(error), str(path))
    finally:
        os.close(fd)


@dataclass(frozen=True)
class RunDir:
    """One run's folder (`run.output_dir`); every file and folder of it is named here and nowhere else."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))  # a config's string works too

    @staticmethod
    def tag(iteration: int | str) -> str:
        """An iteration's folder name, and its DeepSpeed checkpoint tag."""
        return f"iteration-{iteration}"

    def iteration(self, iteration: int) -> Path:
        return self.path / self.tag(iteration)

    def groups(self, iteration: int) -> Path:
        return self.iteration(iteration) / "groups.parquet"

    def batch_ledger(self, iteration: int) -> Path:
        return self.iteration(iteration) / "batches"

    def hf(self, iteration: int) -> Path:
        return self.iteration(iteration) / "hf"

    def exported(self, iteration: int) -> bool:
        """Whether iteration `iteration` has an HF export: a model, or under LoRA an adapter (PEFT format)."""
        return any((self.hf(iteration) / name).is_file() for name in ("config.json", "adapter_config.json"))

    def merged(self, iteration: int) -> Path:
        return self.iteration(iteration) / "merged"

    def probe(self, iteration: int) -> Path:
        return self.iteration(iteration) / "probe.json"

    def complete(self, iteration: int) -> Path:
        return self.iteration(iteration) / "COMPLETE"

    @property
    def deepspeed_root(self) -> Path:
        """The folder DeepSpeed saves into and loads from (each checkpoint is a tag under it)."""
        return self.path / "deepspeed"

    def deepspeed(self, iteration: int) -> Path:
        return self.deepspeed_root / self.tag(iteration)

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    def kept_config(self, iteration: int) -> Path:
        """Where a resume with other settings keeps the config the run had up to `iteration`."""
        return self.path / f"config.{self.tag(iteration)}.yaml"

    @property
    def principles(self) -> Path:
        return self.path / "principles.yaml"

    @property
    def heldout_queries(self) -> Path:
        return self.path / "heldout_queries.jsonl"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def console(self) -> Path:
        return self.path / "console.jsonl"

    @property
    def job_log(self) -> Path:
        return self.path / "job.log"

    @property
    def error_log(self) -> Path:
        return self.path / "error.log"

    @property
    def learner_starts(self) -> Path:
        return self.path / "learner_starts"

    @property
    def stopped(self) -> Path:
        return self.path / "STOPPED"

    @property
    def ray_train(self) -> Path:
        return self.path / "ray_train"

    @property
    def base_model(self) -> Path:
        return self.path / "base_model"

    def share_model(self, folder: str) -> str:
        """A model folder on the driver's own disk (the built-in model's cache) copied into the run folder."""
        shutil.copytree(folder, self.base_model, dirs_exist_ok=True)
        return str(self.base_model)

    @property
    def evaluation(self) -> Path:
        return self.path / "eval"

    @property
    def tracking_state(self) -> Path:
        return self.path / "tracking.json"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def mlflow_store(self) -> Path:
        return self.path / "mlflow.db"

    @property
    def wandb(self) -> Path:
        """W&B's `dir`: it writes its run files into a `wandb/` folder under it."""
        return self.path

    @property
    def lock(self) -> Path:
        return self.path / "LOCK"

    @contextmanager
    def owned(self):
        """Own the folder while the block runs: an exclusive flock on LOCK, so a second run refuses it
        (RunDirInUse). The kernel drops the lock when the holding process ends, however it ends, so a crashed or
        killed run never leaves the folder stuck."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process"
            os.close(fd)
            raise RunDirInUse(f"{self.path} is in use by another run ({holder}); wait for it to end or choose "
                              f"another run.output_dir") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
            yield self
        finally:
            os.close(fd)  # releases the lock

    def complete_iterations(self) -> list[int]:
        return sorted(int(p.parent.name.split("-")[1]) for p in self.path.glob(f"{self.tag('*')}/COMPLETE"))

    def last_complete_iteration(self) -> int:
        return max(self.complete_iterations(), default=0)

    def resume_source(self, iteration: int) -> str | None:
        """What a resume after `iteration` loads: "deepspeed" (weights and optimiser), "hf" (weights only) or None."""
        if self.deepspeed(iteration).is_dir():
            return "deepspeed"
        if self.exported(iteration):
            return "hf"
        return None

    def read_metrics(self) -> list[dict]:
        """metrics.jsonl's rows so far (none before the first complete iteration)."""
        return read_jsonl(self.metrics) if self.metrics.is_file() else []

    def drop_metrics_after(self, iteration: int) -> None:
        """metrics.jsonl without rows after `iteration`, the last complete one: a run stopped between writing an
        iteration's row and its COMPLETE marker left a row for an iteration that a resume trains again."""
        if not self.metrics.is_file():
            return
        lines = [line for line in self.metrics.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line)["iteration"] <= iteration]
        if len(kept) < len(lines):
            partial = self.metrics.with_suffix(".jsonl.partial")
            partial.write_text("".join(line + "\n" for line in kept))
            os.replace(partial, self.metrics)

    def read_probe(self, iteration: int) -> tuple[list[int], list[int]]:
        return tuple(json.loads(self.probe(iteration).read_text()))

    def write_heldout_queries(self, rows: list[dict]) -> None:
        self.heldout_queries.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def record_learner_start(self, attempt: str) -> None:
        """Rank 0, at each start of the learner group: one line with the driver's token (`attempt`)."""
        self.path.mkdir(parents=True, exist_ok=True)
        append_line(self.learner_starts, attempt)

    def learner_start_count(self, attempt: str) -> int:
        """How many times the driver's run `attempt` has started the learner group so far."""
        return self.learner_starts.read_text().split().count(attempt)

    def mark_stopped(self, attempt: str, message: str) -> None:
        """Rank 0: why the run stopped in order (a StopRun), for the driver to report."""
        self.stopped.write_text(json.dumps({"attempt": attempt, "message": message}) + "\n")

    def stop_message(self, attempt: str) -> str | None:
        """The message of a stop of this driver's run (`attempt`), if it stopped."""
        if not self.stopped.is_file():
            return None
        note = json.loads(self.stopped.read_text())
        return note["message"] if note["attempt"] == attempt else None

    def mark_complete(self, iteration: int, record: dict, probe: tuple[list[int], list[int]]) -> None:
        """Rank 0, after every rank saved: the manifests of the checkpoint and the HF export, the probe for a resume's
        re-sync, the metrics row, then the marker."""
        for saved in (self.deepspeed(iteration), self.hf(iteration), self.merged(iteration)):
            if saved.is_dir():
                write_manifest(saved)
        self.probe(iteration).write_text(json.dumps(list(probe)))
        append_line(self.metrics, json.dumps(json_safe(record), allow_nan=False))
        self.complete(iteration).write_text("ok\n")


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


def verify_checkpoint(folder: Path) -> None:
    """Raise CheckpointError unless a DeepSpeed checkpoint is whole (its manifest) and every pickle in it names only
    what DeepSpeed saves (DEEPSPEED_PICKLED_CLASSES): a planted file is refused here, before anything loads it.
    The scan reads the pickles without running them; the learner's weights-only load is the guard itself."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    verify_manifest(folder)
    for path in sorted(folder.rglob("*.pt")):
        try:
            unexpected = sorted(set(get_unsafe_globals_in_checkpoint(str(path))) - set(DEEPSPEED_PICKLED_CLASSES))
        except (ValueError, RuntimeError, KeyError) as e:  # not a torch.save zip archive
            raise CheckpointError(f"{path}: not a checkpoint DeepSpeed wrote ({e}); refusing to unpickle it") from None
        if unexpected:
            raise CheckpointError(f"{path}: its pickle calls {unexpected}, which no DeepSpeed checkpoint holds; "
                                  f"refusing to load it (someone other than the run wrote this file)")


def verify_model_folder(folder: Path) -> None:
    """Raise CheckpointError unless a model folder's weights are whole: its manifest matches (a run's HF export) or,
    without one (a base model, an export of an older run), every safetensors file is as long as its header says."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        verify_manifest(folder)
        return
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="numpy"):  # reads the header only: cheap for any size
                pass
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a whole safetensors file ({e})") from None


def check_model_folders(paths: Iterable[str]) -> None:
    """The evaluation's check of `models.<i>.path` before it loads a model (and in --dry-run): a local folder whose
    weights are not whole is one ConfigError; hub names and missing folders are left to their own checks."""
    for index, path in enumerate(paths):
        folder = Path(path).expanduser()
        if folder.is_dir():
            try:
                verify_model_folder(folder)
            except CheckpointError as e:
                raise ConfigError(f"models.{index}.path: {e}") from None
