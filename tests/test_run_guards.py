"""What keeps a run folder whole (issue 23): one run per folder, Ctrl-C, a full disk, relative paths. The runs are
real runs of configs/tiny.yaml, `python -m pipelines.train` in a subprocess, so signals and exit codes are the
ones a user meets."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from pipelines.train import check_runs
from sami.config import ConfigError, load_config
from sami.run_dir import RunDir, append_line

REPO = Path(__file__).resolve().parents[1]
# One short iteration: 32 queries, 2 optimiser steps.
SMALL = ["data.queries_per_iteration=32", "schedule.steps_per_iteration=2", "sampling.batch_size=8"]


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


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_second_run_on_a_folder_is_refused_and_the_first_is_unaffected(tmp_path):
    out = tmp_path / "run"
    first = start(out, "run.iterations=1")
    wait_for(lambda: RunDir(out).job_log.is_file(), first, "the first run's log")  # opened once the folder is its own
    code, log = finish(start(out, "run.iterations=1"), timeout=120)
    assert code == 2 and log.strip().splitlines() == [
        f"error: run.output_dir: {out} is in use by another run (pid {first.pid} on {socket.gethostname()} since "
        + log.split(" since ", 1)[1].split(")")[0] + "); wait for it to end or choose another run.output_dir"], log
    code, log = finish(first)
    assert code == 0 and iterations(out) == [1], log[-3000:]
    assert "in use by another run" not in RunDir(out).job_log.read_text() + RunDir(out).console.read_text()


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


@pytest.mark.slow
@pytest.mark.timeout(400)
# Ctrl-C: SIGINT to the driver and every process of its group (Ray's own too); SIGTERM: to the driver alone
@pytest.mark.parametrize("signum, kill", [(signal.SIGINT, os.killpg), (signal.SIGTERM, os.kill)],
                         ids=["SIGINT-to-group", "SIGTERM-to-driver"])
def test_ctrl_c_stops_in_seconds_and_resume_continues_without_a_lost_or_repeated_iteration(tmp_path, signum, kill):
    out = tmp_path / "run"
    driver = start(out, "run.iterations=4", start_new_session=True)  # a process group of its own, as a terminal's job
    wait_for(lambda: RunDir(out).complete(1).is_file(), driver, "iteration 1 complete")
    kill(driver.pid, signum)  # the driver's pid is its group's id
    sent = time.monotonic()
    code, log = finish(driver, timeout=120)
    seconds = time.monotonic() - sent
    done = RunDir(out).last_complete_iteration()
    assert code == 128 + signum and log.strip().splitlines()[-1] == (
        f"error: interrupted by {signum.name}: {out} has {done} of 4 iteration(s) complete; continue with: python -m "
        f"pipelines.train --config {out / 'config.yaml'} --resume"), log[-3000:]
    assert seconds < 15, seconds
    assert 1 <= done < 4 and iterations(out) == list(range(1, done + 1))  # an iteration's row only once it is whole
    if signum == signal.SIGTERM:
        return  # the folder is left as SIGINT leaves it; resuming it once (below) is enough for the suite's time
    code, log = finish(start(out, "run.iterations=4", "--resume"))
    assert code == 0, log[-3000:]
    assert iterations(out) == [1, 2, 3, 4]
    assert f"resuming {out} from iteration {done}" in log


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_relative_principle_path_reaches_the_learners(tmp_path):
    """Ray Train v2 moves each learner into a session folder of its own: `configs/principles/hh.yaml`, relative to
    the driver's folder, used to be "principle file not found" on learner rank 0 after Ray had started."""
    out = tmp_path / "run"
    code, log = finish(start(out, "run.iterations=1", "principles.source=file", "principles.path=configs/principles/hh.yaml",
                             "principles.mode=antithesis_all", "principles.principles_per_constitution=null"))
    assert code == 0, log[-3000:]
    assert iterations(out) == [1]
    assert load_config(RunDir(out).config).principles.path == str(REPO / "configs" / "principles" / "hh.yaml")


@contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of `size` mounted on `folder` (root only); skipped where it cannot be mounted."""
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path) -> None:
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass


def whole_lines(path: Path) -> None:
    if path.is_file():
        text = path.read_text()
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
def test_a_disk_that_fills_mid_run_is_one_line_and_resume_continues_once_there_is_space(tmp_path):
    # 4.5 MB: iteration 1 (a 2.4 MB DeepSpeed checkpoint, a 0.6 MB HF export) fits, iteration 2 does not.
    overrides = ("run.iterations=2", "scaling.max_learner_failures=0")  # no restart into the same full disk
    with small_disk(tmp_path / "disk", "4500k") as disk:
        out = disk / "run"
        code, log = finish(start(out, *overrides))
        last = log.strip().splitlines()[-1]
        assert code == 1 and last.startswith("error: no space left on device writing ") and last.endswith(
            f"free some space, then continue with: python -m pipelines.train --config {out / 'config.yaml'} --resume"), log
        assert iterations(out) == [1] and RunDir(out).last_complete_iteration() == 1
        whole_lines(RunDir(out).console)
        whole_lines(RunDir(out).metrics)
        assert RunDir(out).job_log.stat().st_size > 0 and not RunDir(out).error_log.exists()
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space freed
        code, log = finish(start(out, *overrides, "--resume"))
        assert code == 0, log[-3000:]
        assert iterations(out) == [1, 2]


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
