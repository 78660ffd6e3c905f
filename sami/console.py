"""The console a person reads, and the log file that keeps everything else.

An entry point (`python -m pipelines.train`, `python -m pipelines.demo`) opens a log file in its output folder:
file descriptors 1 and 2 then point at it, so Ray's streamed worker output, Ray Train's and DeepSpeed's
messages, C-level warnings and library prints all land there, while the project's own lines go to the console
(a copy of the original descriptors) and to the file. With `--verbose` nothing is redirected: everything shows
on the console, as without this module.

Learner rank 0 runs inside a Ray Train worker, so it reaches the console through a channel file in the run
directory (`console.jsonl`, the first run's in a sequence): its log lines and its progress counts, which the driver follows while the run lasts
and shows, with a progress bar only on a terminal (a pipe, CI or `ray job logs` gets no cursor-control codes).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator, Optional

from sami.run_dir import append_line

PROGRESS_INTERVAL = 0.25  # seconds between two progress events a worker writes (the last one always goes)
POLL_INTERVAL = 0.2  # seconds between two reads of the channel by the driver
VERBOSE_HELP = "show Ray's, Ray Train's, DeepSpeed's and the workers' output on the console too, not only in the log file"


class Console:
    """The process's console: one per process, like its stdout (`console` below)."""

    def __init__(self):
        self.verbose = True  # until an entry point says otherwise: library use and tests print as before
        self.log_path: Optional[Path] = None
        self._saved_fds: Optional[tuple[int, int]] = None  # the original stdout and stderr, while redirected
        self._out = self._err = None  # text streams onto them
        self._lock = threading.Lock()
        self._bars: dict = {}  # label -> the tqdm bar on screen (a terminal only); one-step-off shows two at once

    @contextmanager
    def session(self, verbose: bool) -> Iterator["Console"]:
        """An entry point's lifetime. An unexpected exception leaves its traceback in the log file and one line
        naming the file on the console (exit code 1); otherwise the descriptors are restored at the end."""
        self.verbose = verbose
        try:
            yield self
        except Exception as e:
            if self.log_path is None:
                raise
            with suppress(OSError):  # a full disk: the console line below still shows
                traceback.print_exc()  # into the log file: stderr points there
            self.error(f"error: {type(e).__name__}: {one_line(str(e))} (traceback: {self.log_path})")
            # The descriptors stay on the log file: what Ray prints while the process exits belongs there.
            raise SystemExit(1) from None
        except BaseException:  # Ctrl-C, sys.exit: the console is the person's again
            self._restore()
            raise
        finally:
            self.verbose = True
        self._restore()

    def open_log(self, path: Path) -> Optional[str]:
        """Send descriptors 1 and 2 to `path` (appended); returns the line that tells the person where, or None
        when verbose or a log is open already."""
        if self.verbose or self.log_path is not None:
            return None
        path = Path(path).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved_fds = (os.dup(1), os.dup(2))
        self._out = _stream_onto(sys.stdout, self._saved_fds[0])
        self._err = _stream_onto(sys.stderr, self._saved_fds[1])
        log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        self.log_path = path
        return f"log: {path} (Ray, Ray Train, DeepSpeed, the workers' output; --verbose shows it here)"

    def say(self, line: str, in_log: bool = True) -> None:
        """A line for the person: on the console, and in the log file (unless it is there already)."""
        self._write(line, sys.stdout, self._out, in_log)

    def error(self, line: str) -> None:
        """An error line: on the console's stderr, and in the log file."""
        self._write(line, sys.stderr, self._err, in_log=True)

    def _write(self, line: str, log_stream, console_stream, in_log: bool) -> None:
        shown_on = console_stream or log_stream  # no log file open: stdout and stderr are the console
        if in_log and shown_on is not log_stream:
            with suppress(OSError):  # the log file's disk is full: the person still sees the line
                print(line, file=log_stream, flush=True)
        self._show(line, shown_on)

    @contextmanager
    def follow(self, path: Path) -> Iterator[None]:
        """While the block runs, show what learner rank 0 sends through the channel file `path` (from its end now:
        a resumed run's older lines are not repeated). Nothing to follow when verbose: its lines show already."""
        if self._out is None:
            yield
            return
        offset = path.stat().st_size if path.is_file() else 0
        stop = threading.Event()

        def poll() -> None:
            nonlocal offset
            while True:
                stopping = stop.wait(POLL_INTERVAL)
                events, offset = read_events(path, offset)
                for event in events:
                    self._handle(event)
                if stopping:
                    return

        thread = threading.Thread(target=poll, name="console-follow", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            with self._lock:
                self._close_bars()

    def _handle(self, event: dict) -> None:
        if "line" in event:
            self.say(event["line"], in_log=False)  # the log file has it from the worker's own stdout
        elif self._out.isatty():
            self._progress(event["label"], event["done"], event["total"], event["unit"])

    def _progress(self, label: str, done: int, total: int, unit: str) -> None:
        from tqdm import tqdm

        with self._lock:
            bar = self._bars.get(label)
            if bar is None:
                bar = self._bars[label] = tqdm(total=total, desc=label, unit=unit, file=self._out, leave=False,
                                               dynamic_ncols=True, position=len(self._bars))
            bar.update(done - bar.n)
            if done >= total:
                self._bars.pop(label).close()

    def _close_bars(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

    def _show(self, line: str, stream) -> None:
        with self._lock:
            for bar in self._bars.values():
                bar.clear()
            stream.write(line + "\n")
            stream.flush()
            for bar in self._bars.values():
                bar.refresh()

    def _restore(self) -> None:
        if self._saved_fds is None:
            return
        if "ray" in sys.modules:  # Ray prints its buffered worker output as it shuts down: into the log file still
            sys.modules["ray"].shutdown()
        for stream in (sys.stdout, sys.stderr, self._out, self._err):
            with suppress(OSError):  # what a full disk kept out of the log file is lost, not raised
                stream.flush()
        for fd, saved in zip((1, 2), self._saved_fds):
            os.dup2(saved, fd)
            os.close(saved)
        self._saved_fds = self._out = self._err = self.log_path = None


def _stream_onto(stream, fd: int):
    """A line-buffered text stream onto `fd`, a copy of `stream`'s descriptor; `stream` itself when it has no
    descriptor (a test's capture), so the console still reaches it."""
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return stream
    return open(fd, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)


def one_line(text: str, limit: int = 400) -> str:
    return " ".join(text.split())[:limit]


def read_events(path: Path, offset: int) -> tuple[list[dict], int]:
    """The complete event lines of the channel after byte `offset`, and the offset after the last of them."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next read
    return [json.loads(line) for line in complete.splitlines() if line.strip()], offset + len(complete)


class Channel:
    """Learner rank 0's side of `console.jsonl`: one JSON event a line, each appended whole (or not at all)."""

    def __init__(self, path: Path):
        self._path = path
        self._last_progress: dict[str, float] = {}  # per label: generation and training may overlap
        self._lock = threading.Lock()  # one-step-off generation reports from a thread of its own

    def send(self, event: dict) -> None:
        with self._lock:
            append_line(self._path, json.dumps(event))

    def progress(self, label: str, done: int, total: int, unit: str) -> None:
        """A count towards `total`; a few a second at most reach the file, and always the last one."""
        now = time.monotonic()
        if done < total and now - self._last_progress.get(label, float("-inf")) < PROGRESS_INTERVAL:
            return
        self._last_progress[label] = now
        self.send({"label": label, "done": done, "total": total, "unit": unit})


_channel: Optional[Channel] = None  # in learner rank 0's process, once `open_channel` ran


def open_channel(path: Path) -> None:
    """Learner rank 0: from now on `log` and `report_progress` also reach the driver's console."""
    global _channel
    _channel = Channel(path)


def channel_path() -> Optional[Path]:
    """The console channel's file in this process (learner rank 0), for another process to report through."""
    return _channel._path if _channel is not None else None


def log(message: str) -> None:
    """A learner's line: its stdout (the log file, through Ray), and the console when this is rank 0."""
    line = f"[sami {time.strftime('%H:%M:%S')}] {message}"
    # Not print(): Ray Train patches print in its workers to both log and echo, so every line showed twice.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    if _channel is not None:
        _channel.send({"line": line})


def report_progress(label: str, done: int, total: int, unit: str) -> None:
    """Progress for the console's bar (rank 0 only; elsewhere nothing)."""
    if _channel is not None:
        _channel.progress(label, done, total, unit)


console = Console()
