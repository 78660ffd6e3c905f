"""The data plane's pure parts, without Ray: a rank's shard read while it streams in (`GroupStream`), the
generation batches, how a rank's batches go to the engines and come back in order, the stage's ledger, and that the
stage's process needs no torch."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.data_plane import StageSpec, engine_rows, in_batch_order, ledger_file, read_ledger, write_ledger
from sami.groups import QueryGroup, generation_batches, group_from_json, group_to_json
from sami.learner import GroupStream, StopRun

REPO = Path(__file__).resolve().parents[1]


def groups(n: int) -> list[QueryGroup]:
    return [QueryGroup(query_id=f"q{i}", query=f"query {i}?") for i in range(n)]


class Arrivals:
    """A stand-in for a rank's Ray Data stream: records how many groups were pulled."""

    def __init__(self, items):
        self.items, self.pulled = list(items), 0

    def __iter__(self):
        for item in self.items:
            self.pulled += 1
            yield item


@pytest.mark.parametrize("n, micro, steps", [(7, 3, 6), (8, 4, 4), (2, 3, 3), (5, 5, 2)])
def test_a_stream_reads_as_the_list_it_becomes(n, micro, steps):
    """What `Learner.train` takes from a stream is what it took from the whole list (cycled past its end)."""
    whole, stream = groups(n), GroupStream(iter(groups(n)))
    for cursor in range(0, micro * steps, micro):
        assert [g.query_id for g in stream.take(cursor, micro)] == \
            [whole[(cursor + i) % n].query_id for i in range(micro)]


def test_a_micro_batch_waits_only_for_its_own_groups():
    source = Arrivals(groups(10))
    stream = GroupStream(source, prepare=lambda g: QueryGroup(query_id=g.query_id.upper(), query=g.query))
    assert [g.query_id for g in stream.take(0, 3)] == ["Q0", "Q1", "Q2"] and source.pulled == 3  # the rest not yet
    stream.take(3, 3)
    assert source.pulled == 6 and not stream.exhausted
    assert len(stream.drain()) == 10 and stream.exhausted  # the rest read, so the execution ends


def test_the_learners_rates_leave_out_the_time_it_waited_for_groups(process_group, tiny_model_dir):
    """One real learner (DeepSpeed on CPU, no Ray) trains 2 steps on the same 2 groups, given whole, then streamed
    with the second 0.5 s late: it waited about that long, and its token rate counts only the time it trained."""
    from test_learner import _groups
    from test_resume import learner

    one = learner(tiny_model_dir, "schedule.steps_per_iteration=2")
    pair = _groups(one.tokenizer)

    def late():
        yield pair[0]
        time.sleep(0.5)
        yield pair[1]

    whole, streamed = one.train(1, pair), one.train(2, GroupStream(late()))
    assert whole["time_wait_groups"] < 0.05 and 0.5 <= streamed["time_wait_groups"] < 0.7
    trained_tokens = [r["learner_tokens_per_second"] * (r["time_train"] - r["time_wait_groups"]) for r in (whole, streamed)]
    assert trained_tokens[1] == pytest.approx(trained_tokens[0], rel=1e-6)  # the same tokens, over the time trained


def test_an_empty_shard_stops_the_run():
    with pytest.raises(StopRun, match="fewer groups survived filtering than there are learners"):
        GroupStream(iter([])).take(0, 2)


def test_generation_batches_keep_the_engine_batch_and_give_every_rank_two():
    planned = groups(64)
    assert [len(b) for b in generation_batches(planned, 64, 2)] == [32, 32]  # batch_size // C groups
    assert [len(b) for b in generation_batches(planned, 64, 2, ranks=2)] == [16] * 4  # two per rank to stream
    assert [len(b) for b in generation_batches(groups(256), 64, 2, ranks=1)] == [32] * 8  # the demo's: unchanged
    assert [g.query_id for b in generation_batches(planned, 64, 2, ranks=2) for g in b] == [g.query_id for g in planned]


def spec(engines: int) -> StageSpec:
    return StageSpec(actors=("engine",) * engines, sampling=None, filters=None, seed=0, iteration=1, policy_iteration=0,
                     ledger="", batches=8, console=None, incarnations=(), max_failures=0)


def test_a_ranks_batches_go_to_their_engines_in_order():
    """One stage input row (one task) per engine: rank 1 of 2 streams batches 1, 3, 5, 7."""
    rows = [{"batch": b, "groups": f"groups of {b}"} for b in (1, 3, 5, 7)]
    assert engine_rows(spec(1), rows) == [{"engine": 0, "batches": json.dumps(rows)}]
    assert engine_rows(spec(2), rows) == [{"engine": 1, "batches": json.dumps(rows)}]
    split = engine_rows(spec(4), rows)
    assert [(r["engine"], [b["batch"] for b in json.loads(r["batches"])]) for r in split] == [(1, [1, 5]), (3, [3, 7])]


def test_batches_answered_in_any_order_reach_the_rank_in_batch_order():
    """Each batch is handed on as soon as it and every batch before it are here; a batch that kept no group is
    still waited for; a stream that ends without one of its batches stops the run."""
    handed = []
    arrivals = [(3, ["d"]), (1, ["b1", "b2"]), (5, []), (7, ["e"])]

    def answered():
        for batch, kept in arrivals:
            handed.append(f"arrived {batch}")
            yield batch, json.dumps(kept)

    for group in in_batch_order(answered(), [7, 1, 5, 3]):
        handed.append(group)
    assert handed == ["arrived 3", "arrived 1", "b1", "b2", "d", "arrived 5", "arrived 7", "e"]
    with pytest.raises(StopRun, match=r"ended without batch 5 \(this rank's batches: \[1, 3, 5\]\)"):
        list(in_batch_order(iter([(1, "[]"), (3, "[]")]), [1, 3, 5]))


def test_the_ledger_gives_every_group_back_in_batch_order(tmp_path):
    first, second = groups(2), groups(3)[2:]
    first[1].reject_reason = "identical"
    write_ledger(ledger_file(tmp_path, 1), {"batch": 1, "groups": [g.record() for g in second], "finished": 20.0})
    with pytest.raises(StopRun, match="without batch 0 of 2"):
        read_ledger(tmp_path, 2)
    write_ledger(ledger_file(tmp_path, 0), {"batch": 0, "groups": [g.record() for g in first], "finished": 30.0})
    every, finished = read_ledger(tmp_path, 2)
    assert [(g.query_id, g.reject_reason) for g in every] == [("q0", ""), ("q1", "identical"), ("q2", "")]
    assert finished == 30.0
    assert group_from_json(group_to_json(every[1])) == every[1]


def test_the_stage_process_imports_no_torch():
    """A Ray Data task worker imports the stage's module: torch there costs 1.4 s and 250 MiB a process."""
    code = "import sys, actors.data_plane; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
