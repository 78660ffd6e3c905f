"""What the training driver (pipelines/train.py) hands every learner (pipelines/loop.py): a `LearnerJob`, one
`RunSpec` per run of the sequence. Ray Train passes it to each worker inside `train_loop_config`, which must
be a dict: `as_config` / `from_config` are the one place that knows its key.

No Ray import here: the driver builds these before its slow imports are needed for anything else.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from sami.config import TrainConfig
from sami.run_dir import RunDir

if TYPE_CHECKING:
    from ray.actor import ActorHandle


@dataclass(frozen=True)
class RunSpec:
    """One run, as its learners receive it."""

    cfg: TrainConfig
    run_dir: RunDir
    model_path: str  # model.name_or_path as the driver resolved it (a built-in name becomes its cached folder)
    train_queries: list[dict]  # the rows iterations draw from (the held-out ones are left out)
    actors: tuple[ActorHandle, ...]  # the rollout actors; none for a replay run
    writer: Optional[ActorHandle]  # the principle-writer actor; None: rank 0 serves the principles itself
    attempt: str  # this driver's token: tells its learner restarts and its stop note from older drivers'


@dataclass(frozen=True)
class LearnerJob:
    """The runs one worker group trains one after another, and where learner rank 0 reaches the console."""

    runs: tuple[RunSpec, ...]
    console: Path  # the first run's channel file (RunDir.console)

    def as_config(self) -> dict:
        return {"job": self}

    @staticmethod
    def from_config(config: dict) -> LearnerJob:
        return config["job"]
