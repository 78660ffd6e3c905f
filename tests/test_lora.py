"""LoRA (`model.lora`, sami/lora.py) on one real DeepSpeed learner (ZeRO-2, CPU, gloo, world size 1; no Ray) and the
HF engine: only the adapter trains, the reference is the base exactly with no second model, a sync moves the adapter
alone and the engine then scores the probe as the learner does, checkpoints and resume keep the adapter."""
import pytest
import torch

from sami.config import ConfigError, LoraSettings, ModelConfig, load_config
from sami.lora import BaseView, check_targets, is_adapter_folder, sync_tensors
from sami.logprobs import token_logprobs
from sami.run_dir import RunDir
from test_resume import learner

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LORA = ["model.lora.enabled=true", "model.lora.rank=4", "optim.lr=1e-2"]


def test_a_target_module_the_model_lacks_is_one_clear_error(tiny_model_dir):
    check_targets(str(tiny_model_dir), LoraSettings(enabled=True))  # q/k/v/o_proj: a Llama has them
    with pytest.raises(ConfigError, match=r"model.lora.target_modules: \['query_key_value'\] name no module of .*"
                                          r"its linear layers are \[.*'q_proj'"):
        check_targets(str(tiny_model_dir), LoraSettings(enabled=True, target_modules=["q_proj", "query_key_value"]))
    with pytest.raises(ConfigError, match="c_attn"):  # a built-in world model is checked as the Llama it is
        check_targets("builtin:world-small", LoraSettings(enabled=True, target_modules=["c_attn"]))


def test_lora_settings_are_validated_like_every_section():
    assert not load_config(None).model.lora.enabled  # off by default
    with pytest.raises(ConfigError, match=r"model.lora.rank: Input should be less than or equal to 512 \(got 1000\)"):
        load_config(None, ["model.lora.rank=1000"])
    with pytest.raises(ConfigError, match="model.lora.export_merged is true but deepspeed.zero_stage is 3"):
        load_config(None, ["model.lora.enabled=true", "model.lora.export_merged=true", "deepspeed.zero_stage=3"])
    # the adapter goes through the object store, so a shared GPU with vLLM engines needs no weight_sync override
    shared = ["rollout.engine=vllm", "scaling.gpus_per_learner=0.5", "rollout.gpus_per_engine=0.5"]
    with pytest.raises(ConfigError, match="NCCL"):
        load_config(None, shared)
    assert not load_config(None, [*shared, "model.lora.enabled=true"]).nccl_sync


def test_the_pipeline_refuses_an_unknown_target_before_ray(tmp_path):
    from pipelines.preflight import check_inputs

    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path}", "model.lora.enabled=true",
                                            "model.lora.target_modules=[wq]"])
    with pytest.raises(ConfigError, match=r"\['wq'\] name no module"):
        check_inputs(cfg, contact_endpoints=False)


def groups_of(tokenizer):
    from test_learner import _groups

    return _groups(tokenizer)


@pytest.fixture(scope="module")
def trained(process_group, tiny_model_dir):
    """A LoRA learner with the exact KL on, before and after one optimiser step on two groups; how many models
    its construction loaded."""
    from unittest import mock

    from transformers import AutoModelForCausalLM

    loads = mock.Mock(wraps=AutoModelForCausalLM.from_pretrained)
    with mock.patch.object(AutoModelForCausalLM, "from_pretrained", loads):  # counts, still loads
        one = learner(tiny_model_dir, *LORA, "objective.kl_beta=0.5", "objective.kl_estimator=exact",
                      "schedule.steps_per_iteration=1")
    before = {k: v.detach().clone() for k, v in one.module.named_parameters()}
    groups = groups_of(one.tokenizer)
    stats = one.train(1, groups)
    return one, before, stats, loads.call_count


def test_only_the_adapter_trains_and_is_in_the_optimiser(trained):
    one, before, stats, _ = trained
    after = dict(one.module.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapter = {k for k in before if ".lora_" in k}
    assert changed and changed <= adapter  # some adapter tensors moved (B from 0), nothing of the base did
    assert {k for k, p in after.items() if p.requires_grad} == adapter
    optimised = sum(p.numel() for group in one.engine.optimizer.optimizer.param_groups for p in group["params"])
    assert optimised == sum(after[k].numel() for k in adapter) < sum(p.numel() for p in after.values()) / 10
    assert stats["kl"] == 0.0  # the one step scored with B = 0: the policy is the base, exactly


def test_the_reference_is_the_base_exactly_and_no_second_model(trained, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    one, _, _, loads = trained
    assert loads == 1 and isinstance(one.base, BaseView)  # the policy's own modules, adapter off
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([one.tokenizer("Query: the river\nResponse: The river is long.").input_ids])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        reference, expected, policy = (token_logprobs(m, ids, mask) for m in (one.base, base, one.module))
    assert torch.equal(reference, expected)
    assert (policy - expected).abs().max().item() > 1e-4  # while the trained adapter does change the policy


def test_a_sync_moves_the_adapter_only_and_the_hf_engine_matches_the_probe(trained, tiny_model_dir):
    from actors.weight_sync import state_dict_buckets
    from sami.rollout_engines import HFEngine

    one, _, _, _ = trained
    engine = HFEngine(str(tiny_model_dir), ModelConfig(name_or_path=str(tiny_model_dir), lora=one.cfg.model.lora))
    base_before = {k: v.clone() for k, v in engine.model.named_parameters() if ".lora_" not in k}
    buckets = state_dict_buckets(sync_tensors(one.module), bucket_mb=1)
    moved = sum(a.nbytes for b in buckets for a in b.values())
    adapter = sum(p.numel() for k, p in one.module.named_parameters() if ".lora_" in k)
    assert moved == 4 * adapter and all(".lora_" in name for b in buckets for name in b)
    probe = (one.tokenizer("Query: the mountain\nResponse:").input_ids, one.tokenizer(" It is tall.").input_ids)
    assert abs(engine.sequence_logprob(*probe) - one.probe_logprob(probe)) > 1e-4  # not synced yet
    engine.update_weights(buckets)
    assert abs(engine.sequence_logprob(*probe) - one.probe_logprob(probe)) <= 1e-5
    assert all(torch.equal(v, dict(engine.model.named_parameters())[k]) for k, v in base_before.items())


def test_checkpoints_hold_the_adapter_and_a_resume_continues_with_it(trained, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    one, _, _, _ = trained
    run_dir = RunDir(tmp_path)
    one.cfg.model.lora.export_merged = True
    one.save(run_dir, 1, rank=0)
    (tmp_path / "iteration-1").mkdir(exist_ok=True)
    run_dir.mark_complete(1, {"iteration": 1}, ([1], [2]))
    adapter = {k: v.detach().clone() for k, v in sync_tensors(one.module)}
    assert is_adapter_folder(run_dir.hf(1))
    checkpoint = sum(p.stat().st_size for p in run_dir.deepspeed(1).rglob("*.pt"))
    assert checkpoint < sum(p.numel() for p in one.module.parameters()) * 4  # no frozen base in it
    # the export loads with PeftModel.from_pretrained on its base, and the merged model computes the same
    ids = torch.tensor([one.tokenizer("Query: the river\nResponse: The river is long.").input_ids])
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir.hf(1)).eval()
    merged = AutoModelForCausalLM.from_pretrained(run_dir.merged(1)).eval()
    with torch.no_grad():
        expected = token_logprobs(one.module, ids, torch.ones_like(ids))
        for model in (served, merged):
            assert (token_logprobs(model, ids, torch.ones_like(ids)) - expected).abs().max().item() < 1e-5
    # the evaluation's and Serve's engine (make_engine) serves the export on its base
    from sami.rollout_engines import HFEngine

    probe = (one.tokenizer("Query: the mountain\nResponse:").input_ids, one.tokenizer(" It is tall.").input_ids)
    evaluated = HFEngine(str(run_dir.hf(1)), ModelConfig(name_or_path=str(run_dir.hf(1))))
    assert abs(evaluated.sequence_logprob(*probe) - one.probe_logprob(probe)) <= 1e-5
    for source, overrides in (("deepspeed", []), ("hf", ["checkpoint.deepspeed=false"])):
        if source == "hf":
            import shutil

            shutil.rmtree(run_dir.deepspeed(1))
        fresh = learner(tiny_model_dir, *LORA, *overrides)
        assert fresh.restore(run_dir, 1) == source
        restored = dict(sync_tensors(fresh.module))
        assert restored.keys() == adapter.keys() and all(torch.equal(adapter[k], restored[k]) for k in adapter)
