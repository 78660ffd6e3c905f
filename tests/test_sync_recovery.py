"""An engine lost during the weight sync (actors/weight_sync.py), against engine stand-ins whose process ends inside
a given call: on the object-store path it is restarted, loaded and probe-checked within the sync, as often as
`rollout.max_engine_failures` allows; on the NCCL path (which needs CUDA and vLLM for its broadcast, so only its
control calls run here) the run stops with the way out before a byte is broadcast. And one engine's batches streamed
in order with the next one queued (`EnginePool.stream`, the Ray Data stage's calls): the engine never waits for its
caller, and a call lost in flight is recovered with every call queued behind it, each batch answered once.

The stand-ins are real Ray actors restarted by Ray as the rollout actors are (`max_restarts=-1`,
`max_task_retries=0`); their "probe log-prob" is the sum of the weights they hold, so an engine that skipped a load
fails the probe check. tests/test_faults.py covers the same fault on a real run.
"""
import os
import time
import uuid

import pytest
import torch

import actors.weight_sync as weight_sync
from actors.rollout import EnginePool, RolloutEngineError
from sami.config import RolloutConfig, SamplingConfig
from sami.learner import StopRun

ON_DISK = -99.0  # the probe "log-prob" of an engine holding the weights on disk


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def engines(ray, tmp_path, method: str, exits: int, count: int = 2) -> list:
    """`count` engines; the last one ends in `method` `exits` times (defined here: Ray pickles a local class by
    value, and its workers cannot import this test module)."""
    class FlakyEngine:
        """Ends its process in `method` the first `exits` times it is called there (counted in a file: a restart
        forgets everything else)."""

        def __init__(self, method: str, exits: int, counter: str):
            self.method, self.exits, self.counter = method, exits, counter
            self.incarnation, self.weight_sum = uuid.uuid4().hex, ON_DISK

        def _maybe_exit(self, method: str) -> None:
            done = int(open(self.counter).read()) if os.path.exists(self.counter) else 0
            if method == self.method and done < self.exits:
                with open(self.counter, "w") as f:
                    f.write(str(done + 1))
                os._exit(1)

        def whoami(self) -> str:
            return self.incarnation

        def update_weights(self, buckets) -> dict:
            self._maybe_exit("update_weights")
            self.weight_sum = float(sum(a.sum() for bucket in buckets for a in bucket.values()))
            return {"bytes": sum(a.nbytes for b in buckets for a in b.values()), "dtype": "float32", "incarnation": self.incarnation}

        def sequence_logprob(self, prompt_ids, response_ids) -> float:
            self._maybe_exit("sequence_logprob")
            return self.weight_sum

        def prepare_weight_update(self, names, dtype_names, shapes) -> None:
            self._maybe_exit("prepare_weight_update")

        def receive_weights(self) -> dict:
            return {"dtype": "float32"}

    options = {"num_cpus": 0.5, "max_restarts": -1, "max_task_retries": 0}
    return [ray.remote(FlakyEngine).options(**options).remote(method, exits if e == count - 1 else 0,
                                                              str(tmp_path / f"exits-{e}"))
            for e in range(count)]


def learner_model() -> torch.nn.Module:
    model = torch.nn.Linear(2, 2)
    torch.nn.init.constant_(model.weight, 1.0)
    torch.nn.init.constant_(model.bias, 0.5)
    return model  # its weights sum to 5.0: what a loaded engine scores the probe


PROBE = ([1, 2], [3])
CFG = RolloutConfig(engine="hf", probe_tolerance=1e-4, max_engine_failures=1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["update_weights", "sequence_logprob"])
def test_an_engine_lost_in_the_sync_is_restarted_loaded_and_checked(ray_session, tmp_path, method):
    actors = engines(ray_session, tmp_path, method, exits=1)
    sync = weight_sync.WeightSync(actors, CFG, zero_stage=2, rank=0, use_nccl=False)
    before = list(sync.incarnations)
    assert sync.push(learner_model())["sync_bytes"] == 6 * 4
    assert sync.verify(5.0, PROBE) == 0.0  # the restarted engine holds the learner's weights, not those on disk
    assert sync.restarts == [{"engine": 1, "probe_abs_diff": 0.0}]
    assert sync.incarnations[0] == before[0] and sync.incarnations[1] != before[1]
    assert sync.incarnations[1] == ray_session.get(actors[1].whoami.remote())  # generation will trust it
    assert sync.verify(5.0, PROBE) == 0.0 and len(sync.restarts) == 1  # counted once, in the sync it happened


@pytest.mark.timeout(120)
def test_an_engine_lost_more_often_than_allowed_stops_the_sync(ray_session, tmp_path):
    sync = weight_sync.WeightSync(engines(ray_session, tmp_path, "update_weights", exits=2), CFG, zero_stage=2,
                                  rank=0, use_nccl=False)
    with pytest.raises(RolloutEngineError, match=r"rollout engine 1 lost during the weight sync \(.*\): failed 2 "
                                                 r"time\(s\) in one weight sync \(rollout.max_engine_failures=1\)"):
        sync.push(learner_model())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["prepare_weight_update", "sequence_logprob"])
def test_an_engine_lost_in_an_nccl_sync_stops_with_the_way_out(ray_session, tmp_path, monkeypatch, method):
    broadcasts = []
    monkeypatch.setattr(weight_sync, "broadcast_weights", lambda group, named, wire: broadcasts.append(len(named)))
    sync = weight_sync.WeightSync(engines(ray_session, tmp_path, method, exits=1), CFG, zero_stage=2, rank=0,
                                  use_nccl=False)
    sync.nccl_group = "group"  # the group itself needs CUDA; the control calls around it are the same
    with pytest.raises(StopRun, match="lost during the weight sync .*cannot rejoin the NCCL weight-transfer group.*--resume"):
        sync.push(learner_model())
        assert broadcasts == [2]  # prepare went through on both engines: one broadcast of the one update
        sync.verify(5.0, PROBE)
    assert broadcasts == ([] if method == "prepare_weight_update" else [2])  # never broadcast to a lost engine
    assert sync.restarts == []


def paced_engine(ray, seconds: float, exit_at: str = "", marker: str = ""):
    """An engine stand-in answering each batch after `seconds` (its prompts back as texts) and recording when each
    call ran; it ends its process once, in the call whose first prompt is `exit_at` (`marker`: the file that says
    it did)."""
    class PacedEngine:
        def __init__(self):
            self.incarnation, self.calls = uuid.uuid4().hex, []

        def whoami(self) -> str:
            return self.incarnation

        def generate(self, prompts, sampling, seeds) -> dict:
            started = time.time()
            if prompts[0] == exit_at and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)
            time.sleep(seconds)
            self.calls.append((started, time.time()))
            return {"incarnation": self.incarnation, "completions": [{"text": p} for p in prompts]}

        def call_times(self) -> list:
            return self.calls

    return ray.remote(PacedEngine).options(num_cpus=0.5, max_restarts=-1, max_task_retries=0).remote()


BATCHES = [([f"prompt {i}"], [i]) for i in range(5)]


@pytest.mark.timeout(120)
def test_a_streamed_engine_starts_the_next_batch_while_its_caller_handles_this_one(ray_session):
    """The caller spends 0.2 s on each answer (the stage's filter, ledger and block): streamed, the engine goes from
    one batch to the next at once; called a batch at a time (as one Ray Data task per batch did) it waits 0.2 s."""
    def waits(answers) -> list[float]:
        engine = paced_engine(ray_session, 0.2)
        pool = EnginePool([engine], [ray_session.get(engine.whoami.remote())])
        texts = []
        for completions in answers(pool):
            texts.append([c["text"] for c in completions])
            time.sleep(0.2)
        assert texts == [prompts for prompts, _ in BATCHES]
        calls = ray_session.get(engine.call_times.remote())
        return [later[0] - earlier[1] for earlier, later in zip(calls, calls[1:])]

    streamed = waits(lambda pool: pool.stream(0, BATCHES, SamplingConfig()))
    one_at_a_time = waits(lambda pool: (pool.generate(prompts, SamplingConfig(), seeds) for prompts, seeds in BATCHES))
    assert max(streamed) < 0.1 < 0.15 < min(one_at_a_time), (streamed, one_at_a_time)


@pytest.mark.timeout(120)
def test_a_stream_recovers_a_lost_batch_and_answers_each_once(ray_session, tmp_path):
    """The engine dies in batch 2: after one recovery batch 2 is sent again, and every batch is answered exactly once,
    in order; a failure more than `max_failures` allows stops the stream."""
    engine = paced_engine(ray_session, 0.05, exit_at="prompt 2", marker=str(tmp_path / "exited"))
    incarnations, recovered = [ray_session.get(engine.whoami.remote())], []

    def recover(index: int) -> None:  # as WeightSync.recover: the restarted engine's incarnation is the current one
        recovered.append(index)
        incarnations[index] = ray_session.get(engine.whoami.remote())

    pool = EnginePool([engine], incarnations, recover, max_failures=1)
    answers = [[c["text"] for c in completions] for completions in pool.stream(0, BATCHES, SamplingConfig())]
    assert answers == [prompts for prompts, _ in BATCHES] and recovered == [0]
    assert len(ray_session.get(engine.call_times.remote())) == 3  # the new incarnation answered 2, 3 and 4 once each
    (tmp_path / "exited").unlink()
    strict = EnginePool([engine], incarnations, recover, max_failures=0)
    with pytest.raises(RolloutEngineError, match=r"rollout engine 0 failed 1 time\(s\) in one iteration "
                                                 r"\(rollout.max_engine_failures=0\); last: .*Actor"):
        list(strict.stream(0, BATCHES, SamplingConfig()))
