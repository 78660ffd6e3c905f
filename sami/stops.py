"""`StopRun`, in a module of its own without torch: the data plane's proxy process (actors/data_plane.py) raises
it without importing torch (1.4 s and 250 MiB a process)."""
from __future__ import annotations


class StopRun(RuntimeError):
    """A stop that running the same iteration again cannot fix (unlike a dead worker): every rank stops in order
    and the driver reports the message, instead of Ray Train restarting the learner group into the same error."""
