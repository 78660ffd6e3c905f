"""The learners' small collectives under a process group that serves no CPU tensors, as NCCL's does not.

On GPU the learners' default group is NCCL, whose device map holds `cuda` only: a CPU tensor raises "No backend
type associated with device type cpu". A CPU machine builds the same map with `init_process_group("cuda:gloo")`
(gloo registered for `cuda` only), so these tests run the real code in a world of 2 processes: the stop flag,
the finiteness check, the summed figures of `Learner.train`, the shards' `scatter_object_list`, the probe's broadcast and the
barriers of pipelines/loop.py. Nothing is mocked; the loop's `Loop` is a stand-in holding the four fields `generate_phase`
reads.
"""
import os
import socket
import traceback
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(body, tmp_path) -> list[dict]:
    """`body(rank, tmp_path)` on every rank of a "cuda:gloo" world of 2; each rank's returned dict, in rank order."""
    port = free_port()
    results = mp.get_context("spawn").Manager().dict()
    mp.start_processes(rank_main, args=(body, port, tmp_path, results), nprocs=WORLD, start_method="spawn", join=True)
    return [results[r] for r in range(WORLD)]


def rank_main(rank: int, body, port: int, tmp_path, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("cuda:gloo", rank=rank, world_size=WORLD)
    try:
        assert [d.type for d in dist.group.WORLD._device_types] == ["cuda"]  # no cpu entry, like NCCL's
        results[rank] = body(rank, tmp_path)
    except Exception:
        results[rank] = {"error": traceback.format_exc()}
    finally:
        dist.destroy_process_group()


def learner_collectives(rank: int, tmp_path) -> dict:
    from sami.learner import StopRun, every_rank_finite, stop_together

    out = {}
    try:
        stop_together(StopRun("rank 1 stops") if rank == 1 else None)
        out["stopped"] = None
    except StopRun as e:
        out["stopped"] = str(e)
    stop_together(None)  # nobody stops: returns on every rank
    out["finite"] = [every_rank_finite(1.0), every_rank_finite(float("nan") if rank == 0 else 2.0)]
    from sami.learner import sum_over_ranks  # Learner.train's figures: tokens, FLOPs, peaks of every rank

    out["summed"] = sum_over_ranks([rank + 1, 0.5, 1e15 * rank])
    return out


def loop_collectives(rank: int, tmp_path) -> dict:
    from pipelines.loop import Generation, collect_phase, count_learner_starts, generate_phase
    from sami.config import TrainConfig
    from sami.groups import QueryGroup
    from sami.run_dir import RunDir

    starts = count_learner_starts(RunDir(tmp_path), "attempt-1", rank)  # rank 0 writes, a barrier, every rank reads
    groups = [QueryGroup(query_id=f"q{i}", query=f"query {i}", prompt_ids=[[i, 1]], response_ids=[[i, 2]])
              for i in range(5)]
    upcoming = Future()  # rank 0's groups, whole, as a generation overlapped with training hands them over
    upcoming.set_result(Generation(1, 0, 0.0, {}, groups=groups, saved=True))
    loop = SimpleNamespace(cfg=TrainConfig(), rank=rank, world=WORLD, phase=lambda name: None)
    shard, generation, record = generate_phase(loop, 1, upcoming if rank == 0 else None)
    probe = collect_phase(loop, shard, generation, record, first_micro_batch_at=0.0)  # a barrier, the probe's broadcast
    return {"starts": starts, "shard": [g.query_id for g in shard.drain()], "probe": probe}


@pytest.mark.timeout(180)
def test_learner_collectives_under_a_group_without_cpu(tmp_path):
    results = run_world(learner_collectives, tmp_path)
    assert not [r["error"] for r in results if "error" in r], results
    for rank, r in enumerate(results):
        assert r["summed"] == [3.0, 1.0, 1e15]
        assert r["stopped"] == ("rank 1 stops" if rank == 1 else "stopped together with another learner rank")
        assert r["finite"] == [True, False]


@pytest.mark.timeout(180)
def test_shards_and_barriers_of_the_loop_under_a_group_without_cpu(tmp_path):
    results = run_world(loop_collectives, tmp_path)
    assert not [r["error"] for r in results if "error" in r], results
    assert [r["shard"] for r in results] == [["q0", "q1"], ["q2", "q3"]]  # equal shards, the fifth group dropped
    assert [r["probe"] for r in results] == [([0, 1], [0, 2])] * WORLD
    assert [r["starts"] for r in results] == [1, 1]
