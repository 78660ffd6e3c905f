"""What keeps a run folder whole (issue 23): one run per folder, Ctrl-C, a full disk, relative paths. The runs are
real runs of configs/tiny.yaml, `python -m pipelines.train` in a subprocess, so signals and exit codes are the
ones a user meets."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipelines.train import Interrupt, check_runs, stop_on_signals
from sami.config import ConfigError, load_config
from sami.run_dir import RunDir, append_line
from test_job_submit import SHORT

REPO = Path(__file__).resolve().parents[1]
# One short iteration: 32 queries, 2 optimiser steps.
SMALL = [*SHORT, "sampling.batch_size=8"]


def start(out: Path, *overrides: str, cwd: Path = REPO, **popen) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "pipelines.train", "--config", str(REPO / "configs" / "tiny.yaml"),
                             f"run.output_dir={out}", *SMALL, *overrides], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def wait_for(condition, driver: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert driver.poll() is None, f"the run ended before {what}: {driver.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.1)


def iterations(out: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in RunDir(out).metrics.read_text().splitlines()]


def finish(driver: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    log, _ = driver.communicate(timeout=timeout)
    return driver.returncode, log


def test_a_killed_owner_does_not_keep_the_folder(tmp_path):
    """The lock is the kernel's: SIGKILL the process holding it and the next run owns the folder at once."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom sami.run_dir import RunDir\n"
                               "with RunDir(sys.argv[1]).owned():\n    print('owned', flush=True)\n    time.sleep(120)",
                               str(out)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "owned"
        cfg = load_config(REPO / "configs" / "tiny.yaml", [f"run.output_dir={out}"])
        with ExitStack() as owned, pytest.raises(ConfigError, match=rf"in use by another run \(pid {holder.pid} on "):
            check_runs([cfg], [out], [False], False, print, owned)
    finally:
        holder.kill()
        holder.wait()
    with ExitStack() as owned:
        assert [pending.done for pending in check_runs([cfg], [out], [False], False, print, owned)] == [0]
        assert f"pid {os.getpid()} " in RunDir(out).lock.read_text()


def test_a_signal_is_ours_from_rays_start_to_the_end_of_the_stop():
    """ray.init puts a SIGTERM handler of its own (it exits 1 with no line; a SIGTERM in that window once did):
    `install` takes the signals back. Once the run is stopping (`defer`), a signal is recorded, never raised, so the
    stop finishes and the run still reports it was interrupted."""
    def deliver(signum):
        os.kill(os.getpid(), signum)
        time.sleep(0.2)  # the handler runs in the main thread between bytecodes

    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as signals:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # what ray.init does
        signals.install()
        with pytest.raises(Interrupt):
            deliver(signal.SIGTERM)
        deliver(signal.SIGINT)  # a second signal: ignored
    assert signals.received == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is before
    with stop_on_signals() as stopping:
        stopping.defer()
        deliver(signal.SIGINT)
    assert stopping.received == signal.SIGINT


# The first run's principles: a file named relative to the driver's folder (the relative-path case below).
RELATIVE_PRINCIPLES = ("principles.source=file", "principles.path=configs/principles/hh.yaml",
                       "principles.mode=antithesis_all", "principles.principles_per_constitution=null")
ITERATIONS = 6  # more than the two interrupted runs complete: each signal lands with iterations to go
# What the disk keeps free for the resume between the two signals: its next iteration (a 2.4 MB DeepSpeed checkpoint,
# a 0.6 MB HF export) does not fit; its log lines do.
LEFT_FREE = 800 << 10


@dataclass
class Interrupted:
    """What one signal did to a run: its exit code and console, seconds from the signal to the exit, the last
    complete iteration and the metrics rows' iterations afterwards."""
    code: int
    log: str
    seconds: float
    done: int
    rows: list[int]


@dataclass
class DiskFull:
    """A resume that found the disk full: its exit code and console, and the run folder as it left it."""
    code: int
    log: str
    done: int
    rows: list[int]
    console: str
    metrics: str
    job_log_grew: int  # bytes its log lines added to job.log
    error_log: bool


@dataclass
class TwoInterrupts:
    out: Path
    first_pid: int
    refused: tuple[int, str]  # the second run's exit code and console
    refused_mid_run: bool  # refused before the first run had completed iteration 1
    by: dict[int, Interrupted]  # by signal
    disk_full: DiskFull | None  # None where no tmpfs could be mounted


def interrupt(driver: subprocess.Popen, out: Path, after: int, signum: int, kill) -> Interrupted:
    wait_for(lambda: RunDir(out).complete(after).is_file(), driver, f"iteration {after} complete")
    kill(driver.pid, signum)  # the driver's pid is its group's id
    sent = time.monotonic()
    code, log = finish(driver, timeout=120)
    return Interrupted(code, log, time.monotonic() - sent, RunDir(out).last_complete_iteration(), iterations(out))


def resume_on_a_full_disk(out: Path, disk: Path, *overrides: str) -> DiskFull:
    """Fill `disk` but LEFT_FREE, resume the run in `out` on it, then free the space."""
    run_dir = RunDir(out)
    logged = run_dir.job_log.stat().st_size
    fill(disk, leave=LEFT_FREE)
    code, log = finish(start(out, *overrides, "--resume", start_new_session=True))
    full = DiskFull(code, log, run_dir.last_complete_iteration(), iterations(out), run_dir.console.read_text(),
                    run_dir.metrics.read_text(), run_dir.job_log.stat().st_size - logged, run_dir.error_log.exists())
    (disk / "filler").unlink()  # space freed
    return full


def interrupt_twice(disk: Path, on_tmpfs: bool) -> TwoInterrupts:
    """One folder, three real runs, shared by the second-owner, Ctrl-C/SIGTERM, full-disk and relative-path tests (each
    real run is ~50 s of start-up for ~1 s per iteration). The first run starts with a relative principle path; a
    second run tries its folder while it runs; Ctrl-C (SIGINT to the driver and every process of its group, Ray's own
    too) once iteration 1 is complete. Then --resume on a disk too full for its next iteration (`on_tmpfs`: `disk` is
    a tmpfs), and once there is space again --resume, SIGTERM to its driver alone once it completed one iteration more."""
    out = disk / "run"
    overrides = (f"run.iterations={ITERATIONS}", *RELATIVE_PRINCIPLES,
                 "scaling.max_learner_failures=0")  # no learner restart into the same full disk
    first = start(out, *overrides, start_new_session=True)  # a process group of its own, as a terminal's job
    drivers = [first]
    try:
        wait_for(lambda: RunDir(out).job_log.is_file(), first, "the first run's log")  # once the folder is its own
        drivers.append(start(out, *overrides, start_new_session=True))
        refused = finish(drivers[-1], timeout=120)
        refused_mid_run = not RunDir(out).complete(1).exists()
        by_sigint = interrupt(first, out, 1, signal.SIGINT, os.killpg)
        full = resume_on_a_full_disk(out, disk, *overrides) if on_tmpfs else None
        drivers.append(start(out, *overrides, "--resume", start_new_session=True))
        by_sigterm = interrupt(drivers[-1], out, by_sigint.done + 1, signal.SIGTERM, os.kill)
    finally:  # a failed step (a second run not refused, a run that never stops) leaves no run behind
        for driver in drivers:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
    return TwoInterrupts(out, first.pid, refused, refused_mid_run, {signal.SIGINT: by_sigint, signal.SIGTERM: by_sigterm},
                         full)


@pytest.fixture(scope="module")
def interrupted_twice(tmp_path_factory):
    """The runs of `interrupt_twice`, in a folder on a tmpfs where one can be mounted (root only)."""
    disk = tmp_path_factory.mktemp("interrupted") / "disk"
    with tmpfs(disk, "64m") as on_tmpfs:
        yield interrupt_twice(disk, on_tmpfs)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_second_run_on_a_folder_is_refused_and_the_first_is_unaffected(interrupted_twice):
    run, (code, log) = interrupted_twice, interrupted_twice.refused
    out = run.out
    assert code == 2 and log.strip().splitlines() == [
        f"error: run.output_dir: {out} is in use by another run (pid {run.first_pid} on {socket.gethostname()} since "
        + log.split(" since ", 1)[1].split(")")[0] + "); wait for it to end or choose another run.output_dir"], log
    assert run.refused_mid_run  # refused while the first run was on its way to iteration 1
    assert run.by[signal.SIGINT].done >= 1, run.by[signal.SIGINT].log[-3000:]  # and the first went on
    assert "in use by another run" not in RunDir(out).job_log.read_text() + RunDir(out).console.read_text()


# Ctrl-C: SIGINT to the driver and every process of its group; SIGTERM (to the resumed run): to the driver alone
@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT-to-group", "SIGTERM-to-driver"])
def test_ctrl_c_stops_in_seconds_and_resume_continues_without_a_lost_or_repeated_iteration(interrupted_twice, signum):
    out, stopped = interrupted_twice.out, interrupted_twice.by[signum]
    assert stopped.code == 128 + signum and stopped.log.strip().splitlines()[-1] == (
        f"error: interrupted by {signum.name}: {out} has {stopped.done} of {ITERATIONS} iteration(s) complete; continue "
        f"with: python -m pipelines.train --config {out / 'config.yaml'} --resume"), stopped.log[-3000:]
    assert stopped.seconds < 15, stopped.seconds
    assert 1 <= stopped.done < ITERATIONS and stopped.rows == list(range(1, stopped.done + 1))  # a row once it is whole
    if signum == signal.SIGTERM:  # the run it stopped was the resume of the one Ctrl-C stopped
        before = interrupted_twice.by[signal.SIGINT].done
        assert f"resuming {out} from iteration {before}" in stopped.log and stopped.done > before, stopped.log[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_relative_principle_path_reaches_the_learners(interrupted_twice):
    """Ray Train v2 moves each learner into a session folder of its own: `configs/principles/hh.yaml`, relative to
    the driver's folder, used to be "principle file not found" on learner rank 0 after Ray had started."""
    run_dir = RunDir(interrupted_twice.out)
    assert interrupted_twice.by[signal.SIGINT].done >= 1  # the first run, started with the relative path, trained
    assert load_config(run_dir.config).principles.path == str(REPO / "configs" / "principles" / "hh.yaml")
    assert [p["name"] for p in yaml.safe_load((run_dir.path / "principles.yaml").read_text())["principles"]] == [
        "helpful", "harmless"]  # what learner rank 0 read from it


@contextmanager
def tmpfs(folder: Path, size: str):
    """A tmpfs of `size` mounted on `folder` (root only): yields whether it could be mounted."""
    folder.mkdir()
    mounted = not subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                 capture_output=True).returncode
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=True)


@contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of `size` mounted on `folder`; skipped where it cannot be mounted."""
    with tmpfs(folder, size) as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        yield folder


def fill(folder: Path, leave: int = 0) -> None:
    """Write `folder`/filler until the disk has no more than `leave` bytes free."""
    with open(folder / "filler", "wb") as f:
        try:
            while (room := shutil.disk_usage(folder).free - leave) > 0:
                f.write(b"\0" * min(room, 1 << 16))
                f.flush()
        except OSError:
            pass


def whole_lines(text: str) -> None:
    assert not text or text.endswith("\n")
    assert all(json.loads(line) is not None for line in text.splitlines())


def test_starting_on_a_full_disk_is_one_line(tmp_path):
    with small_disk(tmp_path / "disk", "1m") as disk:
        out = disk / "run"
        out.mkdir()
        fill(disk)
        code, log = finish(start(out, "run.iterations=1"), timeout=120)
        assert code == 1 and log.strip().splitlines() == [
            f"error: no space left on device writing {out} (0.0 MiB free in {out}); free some space, then run it "
            f"again without --resume (it had not started: no config.yaml)"], log
        assert not RunDir(out).job_log.exists()  # refused before the log file: no empty job.log


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_disk_that_fills_mid_run_is_one_line_and_resume_continues_once_there_is_space(interrupted_twice):
    """The resume between the two signals trains an iteration it cannot save (scaling.max_learner_failures=0: no
    restart into the same full disk); the resume after it, once there is space, continues."""
    out, full = interrupted_twice.out, interrupted_twice.disk_full
    if full is None:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    last = full.log.strip().splitlines()[-1]
    assert full.code == 1 and last.startswith("error: no space left on device writing ") and last.endswith(
        f"free some space, then continue with: python -m pipelines.train --config {out / 'config.yaml'} --resume"), full.log
    before = interrupted_twice.by[signal.SIGINT].done
    assert full.rows == list(range(1, before + 1)) and full.done == before  # nothing of the unsaved iteration kept
    whole_lines(full.console)
    whole_lines(full.metrics)
    assert full.job_log_grew > 0 and not full.error_log
    resumed = interrupted_twice.by[signal.SIGTERM]
    assert f"resuming {out} from iteration {before}" in resumed.log, resumed.log[-3000:]
    assert resumed.done > before and resumed.rows == list(range(1, resumed.done + 1))


def test_a_line_the_disk_cannot_hold_is_not_written_at_all(tmp_path):
    with small_disk(tmp_path / "disk", "64k") as disk:
        path, line = disk / "metrics.jsonl", json.dumps({"iteration": 1, "text": "x" * 1000})
        with pytest.raises(OSError, match=f"No space left on device: '{path}'"):
            for _ in range(100):
                append_line(path, line)
        text = path.read_text()
        assert text.endswith("\n") and set(text.splitlines()) == {line}  # whole lines, none cut


def test_a_resume_drops_the_row_of_an_iteration_that_never_completed(tmp_path):
    """Killed between writing iteration 2's metrics row and its COMPLETE: the row goes, iteration 2 trains again."""
    run_dir = RunDir(tmp_path)
    for k in (1, 2):
        append_line(run_dir.metrics, json.dumps({"iteration": k}))
    run_dir.drop_metrics_after(1)
    assert iterations(tmp_path) == [1]
