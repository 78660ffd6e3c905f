"""JSON Lines, read and written in one place: queries, MT-Bench and GSM8K files, the evaluation's saved outputs."""
from __future__ import annotations

import json
from pathlib import Path

from sami.config import ConfigError


class JSONLError(ConfigError):
    """A JSONL file that cannot be read: the message names the file and the line (a user's mistake, exit 2)."""


def read_jsonl(path: str | Path) -> list:
    """One value per non-blank line."""
    return [value for _, value in numbered_jsonl(path)]


def numbered_jsonl(path: str | Path) -> list[tuple[int, object]]:
    """(line number, value) of every non-blank line; bytes that are not UTF-8 are refused with their line."""
    path = Path(path)
    if not path.is_file():
        raise JSONLError(f"{path}: file not found")
    rows = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise JSONLError(f"{path} line {number}: not UTF-8 (byte {raw[error.start]:#04x} at column "
                             f"{error.start + 1})") from None
        if line.strip():
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise JSONLError(f"{path} line {number}: not valid JSON ({error})") from None
    return rows


def write_jsonl(path: str | Path, records) -> None:
    """One JSON object a line; the folder is made if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
