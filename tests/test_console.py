"""The console and its log file (sami/console.py): the channel learner rank 0 writes, and an entry point's console
in a fresh interpreter (descriptors 1 and 2 are the process's own), on a pipe and on a terminal."""
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import textwrap
from pathlib import Path


from sami import console as console_module
from sami.console import Channel, read_events
from sami.run_dir import RunDir

REPO = Path(__file__).resolve().parents[1]
CURSOR_CODES = ("\r", "\x1b[")


def test_the_channel_keeps_every_line_and_a_few_progress_counts_a_second(tmp_path, monkeypatch):
    channel = Channel(RunDir(tmp_path).console)
    channel.send({"line": "iteration 1/3 [sami]: generating"})
    for done in range(1, 101):  # a hundred counts in far less than the interval: the first and the last go
        channel.progress("iteration 1 generate", done, 100, "batch")
    events, offset = read_events(RunDir(tmp_path).console, 0)
    assert events == [{"line": "iteration 1/3 [sami]: generating"},
                      {"label": "iteration 1 generate", "done": 1, "total": 100, "unit": "batch"},
                      {"label": "iteration 1 generate", "done": 100, "total": 100, "unit": "batch"}]
    assert read_events(RunDir(tmp_path).console, offset) == ([], offset)


def test_a_line_still_being_written_waits_for_the_next_read(tmp_path):
    path = RunDir(tmp_path).console
    path.write_text(json.dumps({"line": "a"}) + "\n" + '{"line": "b')
    events, offset = read_events(path, 0)
    assert events == [{"line": "a"}]
    with open(path, "a") as f:
        f.write('"}\n')
    assert read_events(path, offset)[0] == [{"line": "b"}]
    assert read_events(tmp_path / "absent.jsonl", 7) == ([], 7)


def test_log_reaches_the_channel_only_in_rank_zero(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(console_module, "_channel", None)
    console_module.log("not rank 0")
    console_module.report_progress("iteration 1 train", 1, 2, "step")
    assert not (RunDir(tmp_path).console).exists()
    console_module.open_channel(RunDir(tmp_path).console)
    console_module.log("iteration 1 done: loss 0.7 -> 0.6")
    console_module.report_progress("iteration 1 train", 2, 2, "step")
    events, _ = read_events(RunDir(tmp_path).console, 0)
    assert events[0]["line"].endswith("] iteration 1 done: loss 0.7 -> 0.6") and events[0]["line"].startswith("[sami ")
    assert events[1] == {"label": "iteration 1 train", "done": 2, "total": 2, "unit": "step"}
    assert "not rank 0" in capsys.readouterr().out  # every rank's lines stay on its stdout (the log file)


# An entry point in miniature: a log file, framework output at the descriptor level and through Python, rank 0's
# channel followed while "training" runs, then an error line or a crash.
SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from sami.console import Channel, console
    from sami.run_dir import RunDir
    run_dir = RunDir(Path(sys.argv[1]))
    with console.session(verbose=sys.argv[2] == "verbose"):
        opened = console.open_log(run_dir.job_log)
        assert (opened is None) == (sys.argv[2] == "verbose")
        console.say(f"log: {console.log_path}")
        os.write(1, b"(RayTrainWorker pid=1) framework on fd 1\\n")
        os.write(2, b"C-level warning on fd 2\\n")
        print("\\rLoading weights: 100%|###| \\x1b[0m", file=sys.stderr)
        channel = Channel(run_dir.console)
        with console.follow(run_dir.console):
            channel.send({"line": "[sami 00:00:00] iteration 1/1 [sami]: generating"})
            for step in range(1, 5):
                channel.progress("iteration 1 train", step, 4, "step")
                time.sleep(0.3)
            channel.send({"line": "[sami 00:00:01] iteration 1 done: loss 0.7 -> 0.6"})
        if sys.argv[3] == "crash":
            raise KeyError("boom")
        console.error("error: the run stopped")
    print("after the session: the console again")
""")


def run_script(run_dir: Path, mode: str = "quiet", end: str = "error", terminal: bool = False):
    """(exit code, everything the console showed) of SCRIPT, on a pipe or on a pseudo-terminal."""
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-c", SCRIPT, str(run_dir), mode, end]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if not terminal:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=60)
        return done.returncode, done.stdout
    main, side = pty.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a fresh pty has 0 columns
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=side, stderr=side)
    os.close(side)
    shown = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the other side closed
            break
        if not chunk:
            break
        shown += chunk
    os.close(main)
    return proc.wait(timeout=60), shown.decode(errors="replace")


def test_on_a_pipe_the_console_has_the_project_lines_and_no_cursor_codes(tmp_path):
    code, shown = run_script(tmp_path)
    log = (tmp_path / "job.log").read_text()
    assert code == 0, shown
    assert shown.splitlines() == [f"log: {tmp_path / 'job.log'}", "[sami 00:00:00] iteration 1/1 [sami]: generating",
                                  "[sami 00:00:01] iteration 1 done: loss 0.7 -> 0.6", "error: the run stopped",
                                  "after the session: the console again"]
    assert not any(code in shown for code in CURSOR_CODES)
    for line in ("framework on fd 1", "C-level warning on fd 2", "Loading weights", "log: ", "error: the run stopped"):
        assert line in log
    assert "iteration 1 done" not in log  # rank 0's lines reach the log file through the worker's own stdout


def test_on_a_terminal_the_console_shows_a_progress_bar(tmp_path):
    code, shown = run_script(tmp_path, terminal=True)
    assert code == 0, shown
    assert "iteration 1 train:" in shown and "/4 [" in shown and "framework" not in shown


def test_a_crash_leaves_its_traceback_in_the_log_file_and_one_line_on_the_console(tmp_path):
    code, shown = run_script(tmp_path, end="crash")
    assert code == 1
    assert shown.splitlines()[-1] == f"error: KeyError: 'boom' (traceback: {tmp_path / 'job.log'})"
    assert "Traceback" not in shown and "Traceback (most recent call last)" in (tmp_path / "job.log").read_text()


def test_verbose_leaves_everything_on_the_console(tmp_path):
    code, shown = run_script(tmp_path, mode="verbose")
    assert code == 0 and "framework on fd 1" in shown and "C-level warning on fd 2" in shown
    assert "iteration 1 done" not in shown  # rank 0's lines come through Ray's worker output there
    assert not (tmp_path / "job.log").exists()


def test_in_process_the_error_line_reaches_a_captured_stderr_once(tmp_path, capsys):
    """A test's capture has no descriptor: the console writes to it, and descriptors 1 and 2 come back after."""
    from sami.console import Console

    console = Console()
    before = os.fstat(1).st_ino, os.fstat(2).st_ino
    with console.session(verbose=False):
        assert console.open_log(tmp_path / "job.log")
        os.write(2, b"framework\n")
        console.error("error: the run stopped")
    assert capsys.readouterr().err == "error: the run stopped\n"
    assert (os.fstat(1).st_ino, os.fstat(2).st_ino) == before and "framework" in (tmp_path / "job.log").read_text()
