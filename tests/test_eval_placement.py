"""Where the evaluation builds a vLLM engine with tensor parallelism: Ray's logical GPUs (`ray.init(num_gpus=2)`).

vLLM cannot run here, so the evaluation imports a stand-in `vllm` package (written below, put on the Ray
workers' path) whose `LLM` does what vLLM 0.33 does with placement groups and nothing else:
- vllm/engine/arg_utils.py: `if is_in_ray_actor(): placement_group = ray.util.get_current_placement_group()`
  (`is_in_ray_actor`, vllm/ray/lazy_utils.py: Ray is initialised and the runtime context has an actor id);
- vllm/v1/executor/ray_utils.py `initialize_ray_cluster`, run in the engine-core process (not a Ray worker):
  with no group passed in, it makes one of `world_size` GPU bundles, strategy PACK, and waits for it.
It records what it found and answers every prompt with an empty completion.
"""
import json
import os
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

STAND_IN = '''
import json, os
from types import SimpleNamespace

import ray


class LLM:
    def __init__(self, tensor_parallel_size=1, **kwargs):
        in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
        group = ray.util.get_current_placement_group() if in_actor else None
        own = None
        if group is None and tensor_parallel_size > 1:
            own = ray.util.placement_group([{"GPU": 1.0}] * tensor_parallel_size, strategy="PACK")
            own.wait(5)
        live = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
        with open(os.environ["FAKE_VLLM_RECORD"], "w") as f:
            json.dump({"in_actor": in_actor, "bundles": group.bundle_specs if group else None,
                       "own_group": own is not None,
                       "gpus_reserved": sum(b.get("GPU", 0) for g in live for b in g["bundles"].values())}, f)

    def generate(self, prompts, params, use_tqdm=False, lora_request=None):  # vLLM 0.33: LLM.generate(..., lora_request)
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[], finish_reason="length")]) for _ in prompts]


class SamplingParams:
    def __init__(self, **kwargs):
        pass


def TokensPrompt(prompt_token_ids):
    return {"prompt_token_ids": prompt_token_ids}
'''


@pytest.mark.timeout(300)
def test_a_tensor_parallel_vllm_model_reserves_its_gpus_once(tmp_path, tiny_model_dir):
    import ray

    from actors.rollout import vllm_bundles
    from evals.config import EvalConfig
    from evals.generate import generate_all
    from evals.plan import EvalPlan
    from sami.groups import QueryGroup

    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text(textwrap.dedent(STAND_IN))
    (tmp_path / "vllm" / "config.py").write_text("def WeightTransferConfig(**kwargs):\n    return kwargs\n")
    record = tmp_path / "record.json"
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")]),
           "FAKE_VLLM_RECORD": str(record)}
    cfg = EvalConfig(models=[{"name": "m", "path": str(tiny_model_dir)}], win_rates={"enabled": False},
                     mi_bound={"enabled": False},
                     generation={"engine": "vllm", "tensor_parallel_size": 2, "gpus_per_model": 2,
                                 "sampling": {"max_new_tokens": 4, "batch_size": 2}})
    plan = EvalPlan([QueryGroup("q0", "Tell me about the river.", constitutions=["Be kind.", "Be rude."],
                                generation_prompts=["Be kind. The river?", "Be rude. The river?"])])
    ray.init(num_cpus=3, num_gpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        outputs = generate_all(cfg, plan)
        deadline = time.monotonic() + 30  # a removed group's resources come back shortly after
        while ray.available_resources().get("GPU", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        free_after = ray.available_resources().get("GPU", 0)
    finally:
        ray.shutdown()
    seen = json.loads(record.read_text())
    assert outputs["m"].responses == [["", ""]]
    # built in an actor that owns the engine's group: vLLM takes that group (2 GPU bundles) and makes none
    assert seen["in_actor"] and seen["bundles"] == vllm_bundles(2) and not seen["own_group"]
    assert seen["gpus_reserved"] == 2 and free_after == 2  # reserved once while generating, released after
