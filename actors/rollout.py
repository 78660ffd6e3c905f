"""`RolloutActor`: a Ray actor holding one rollout engine for the whole run (weights synced, never reloaded)."""
from __future__ import annotations

import time

import numpy as np
import ray

from pipelines.config import ModelConfig, RolloutConfig, SamplingConfig


class RolloutWorker:
    """The actor's body; a plain class so tests can run it without Ray."""

    def __init__(self, model_path: str, rollout_cfg: RolloutConfig, model_cfg: ModelConfig):
        from actors.rollout_engines import make_engine

        self.engine = make_engine(model_path, rollout_cfg, model_cfg)

    def generate(self, prompts: list[str], sampling: SamplingConfig, seed: int) -> list[dict]:
        return [c.__dict__ for c in self.engine.generate(prompts, sampling, seed)]

    def update_weights(self, buckets: list[dict[str, np.ndarray]]) -> dict:
        """One control call per sync: all buckets arrive in one object-store reference."""
        start = time.perf_counter()
        self.engine.update_weights(buckets)
        self.engine.reset_prefix_cache()
        nbytes = sum(a.nbytes for bucket in buckets for a in bucket.values())
        return {"seconds": time.perf_counter() - start, "bytes": nbytes}

    def sequence_logprob(self, prompt_ids: list[int], response_ids: list[int]) -> float:
        return self.engine.sequence_logprob(prompt_ids, response_ids)

    def reset_prefix_cache(self) -> None:
        self.engine.reset_prefix_cache()


RolloutActor = ray.remote(RolloutWorker)


def start_rollout_actors(model_path: str, rollout_cfg: RolloutConfig, model_cfg: ModelConfig) -> list:
    """One actor per engine; a vLLM engine with tensor parallelism gets a placement group of TP GPU bundles."""
    actors = []
    for index in range(rollout_cfg.num_engines):
        options = {"num_cpus": rollout_cfg.cpus_per_engine, "name": None, "max_concurrency": 1}
        if rollout_cfg.engine == "vllm":
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            bundles = [{"GPU": 1, "CPU": 1}] * rollout_cfg.tensor_parallel_size
            pg = placement_group(bundles, strategy="PACK")
            ray.get(pg.ready())
            # the actor takes the first bundle; vLLM's Ray executor places the other TP workers in the group
            options.update(num_cpus=0, num_gpus=0 if rollout_cfg.tensor_parallel_size > 1 else 1,
                           scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True))
        options.pop("name")
        actors.append(RolloutActor.options(**options).remote(model_path, rollout_cfg, model_cfg))
    return actors
