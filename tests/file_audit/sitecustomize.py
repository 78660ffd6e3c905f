"""Imported by every Python process that starts with this folder on PYTHONPATH (tests/test_autoscaling.py puts it
there for one job). With SAMI_FILE_AUDIT set, each process appends the files it opens through Python (`open`,
`os.open`: an audit hook, so C extensions' own reads are not seen) to a file of its own in that folder, named by
the node it runs on (RAY_CLOUD_INSTANCE_ID: the fake provider's node id, inherited from the node's raylet)."""
import os
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def audit_opens(folder: str) -> None:
    node = os.environ.get("RAY_CLOUD_INSTANCE_ID", "unknown")
    log = open(os.path.join(folder, f"{node}.{os.getpid()}.tsv"), "a", buffering=1)

    def hook(event: str, args: tuple) -> None:
        if event != "open" or not isinstance(args[0], str):
            return
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
        log.write(f"{'w' if writes else 'r'}\t{os.path.abspath(path)}\n")

    sys.addaudithook(hook)


if os.environ.get("SAMI_FILE_AUDIT"):
    audit_opens(os.environ["SAMI_FILE_AUDIT"])
