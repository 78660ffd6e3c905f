"""The built-in world: a synthetic constitution world where SAMI's effect is measurable on a CPU in minutes."""
from pipelines.world.base_model import BaseModelSpec, ensure_base_model
from pipelines.world.grammar import LIBRARY, SUBJECTS, Query, render_response, sample_query
from pipelines.world.rules import (
    HELDOUT_PRINCIPLES,
    PRINCIPLES,
    TRAINING_PRINCIPLES,
    WorldJudge,
    adherence,
    adherence_score,
    well_formed,
)
