"""`schedule.rollout`: which generation overlaps which training (no Ray: the loop's rank-0 decisions with a
stand-in for the generation), and the staleness every group carries into groups.parquet."""
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet
import pytest

import pipelines.loop as loop_module
from sami.config import load_config
from sami.groups import QueryGroup


def fake_loop(rank=0, *overrides):
    cfg = load_config(None, ["run.iterations=3", *overrides])
    return SimpleNamespace(cfg=cfg, rank=rank, engine_weights=4)


@pytest.fixture
def generated(monkeypatch):
    calls = []
    monkeypatch.setattr(loop_module, "start_generation", lambda loop, it, policy: calls.append((it, policy)) or "k+1")
    monkeypatch.setattr(loop_module, "complete_generation", lambda loop, generation: calls.append(generation) or [])
    return calls


def test_one_step_off_generates_the_next_iteration_on_the_weights_the_engines_hold(generated):
    upcoming = loop_module.start_next_generation(fake_loop(0, "schedule.rollout=one_step_off"), 2)
    assert loop_module.finish_generation(upcoming) >= 0 and upcoming.result() == "k+1"
    assert generated == [(3, 4), "k+1"]  # generated whole in the thread, before iteration 3 starts


@pytest.mark.parametrize("rank, iteration, overrides", [
    (0, 2, []),  # sync
    (0, 3, ["schedule.rollout=one_step_off"]),  # the last iteration: nothing comes after it
    (1, 2, ["schedule.rollout=one_step_off"]),  # rank 0 alone generates
    (0, 2, ["schedule.rollout=one_step_off", "data.replay_groups_from=/elsewhere"]),  # a replay only reads
])
def test_nothing_overlaps_where_there_is_nothing_to_generate(generated, rank, iteration, overrides):
    assert loop_module.start_next_generation(fake_loop(rank, *overrides), iteration) is None
    assert loop_module.finish_generation(None) >= 0 and generated == []


def test_staleness_round_trips_through_groups_parquet_and_older_files_read_as_unknown(tmp_path):
    group = QueryGroup(query_id="q", query="q?", responses=["a.", "b."], policy_iteration=1, staleness=1)
    pyarrow.parquet.write_table(pa.Table.from_pylist([group.record()]), tmp_path / "new.parquet")
    (row,) = pyarrow.parquet.read_table(tmp_path / "new.parquet").to_pylist()
    assert (QueryGroup.from_record(row).policy_iteration, QueryGroup.from_record(row).staleness) == (1, 1)
    old = {k: v for k, v in group.record().items() if k not in ("policy_iteration", "staleness")}
    assert QueryGroup.from_record(old).staleness is None
