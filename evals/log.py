"""The evaluation job's console line, shared by its phases."""
from __future__ import annotations

import time

from sami.console import console


def log(message: str) -> None:
    console.say(f"[eval {time.strftime('%H:%M:%S')}] {message}")
