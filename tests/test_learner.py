"""The learner's pure parts: DeepSpeed settings derived once, the loss step, step summaries (no Ray, no DeepSpeed)."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evals.mi_bound import mi_bounds
from sami.config import ModelConfig, load_config
from sami.groups import QueryGroup, tokenise_pairs
from sami.learner import deepspeed_settings, summarise_steps
from sami.scoring import micro_batch_loss
from sami.logprobs import collate_sequences, token_logprobs
from sami.objectives import scoring_for
from sami.rollout_engines import HFEngine


def test_deepspeed_settings_derived_from_the_config():
    cfg = load_config(None, ["optim.groups_per_step=16", "optim.micro_batch_groups=4", "optim.grad_clip=0.5",
                             "deepspeed.zero_stage=3", "scaling.num_learners=2"])
    s = deepspeed_settings(cfg, world_size=2, use_gpu=False)
    assert (s.micro_groups, s.accumulation, s.bf16) == (4, 2, False)
    assert s.config["train_batch_size"] == 16 and s.config["gradient_accumulation_steps"] == 2
    assert s.config["zero_optimization"] == {"stage": 3} and s.config["gradient_clipping"] == 0.5
    assert deepspeed_settings(cfg, 2, use_gpu=True).bf16  # bf16: auto means on where there is a GPU
    # micro-batches larger than a rank's share are cut to it; a share they do not divide is refused
    assert deepspeed_settings(load_config(None, ["optim.groups_per_step=4", "optim.micro_batch_groups=8"]), 2, False).micro_groups == 2
    with pytest.raises(ValueError, match="must divide"):
        deepspeed_settings(load_config(None, ["optim.groups_per_step=12", "optim.micro_batch_groups=4"]), 2, False)


def test_one_precision_rule_honours_model_dtype_and_deepspeed_bf16():
    """CPU: float32 as before. GPU: bf16 under DeepSpeed's bf16 (float32 master copy), else float32 weights; issue 22,
    defect 8: deepspeed.bf16=false on a GPU used to load bf16 weights with no float32 copy (small updates vanish)."""
    def on(use_gpu, *overrides):
        s = deepspeed_settings(load_config(None, ["scaling.gpus_per_learner=1", *overrides]), 1, use_gpu)
        return s.dtype, s.bf16, s.config["bf16"]["enabled"]

    assert on(False) == (torch.float32, False, False)
    assert on(False, "model.dtype=bfloat16") == (torch.float32, False, False)  # DeepSpeed bf16 auto: GPU only
    assert on(True) == (torch.bfloat16, True, True)
    assert on(True, "deepspeed.bf16=false") == (torch.float32, False, False)
    assert on(True, "model.dtype=float32") == (torch.float32, False, False)
    assert on(True, "model.dtype=bfloat16", "deepspeed.bf16=true") == (torch.bfloat16, True, True)


def test_summarise_steps():
    stats = [{"loss": 1.0, "kl": 0.1}, {"loss": 3.0, "kl": 0.3}, {"loss": 0.5, "kl": 0.2}, {"loss": 1.5, "kl": 0.2}]
    out = summarise_steps(stats, accumulation=2)
    assert out["loss_per_step"] == [2.0, 1.0] and (out["loss_first_step"], out["loss_last_step"]) == (2.0, 1.0)
    assert out["loss"] == 1.5 and out["kl"] == pytest.approx(0.2)


GROUPS_TEXT = [(["Constitution:\n1. Be polite.\n\nQuery: the river\nResponse:",
                 "Constitution:\n1. Be curt.\n\nQuery: the river\nResponse:"],
                ["Please note, the river is long.", "The river is long."]),
               (["Constitution:\n1. Be concise.\n\nQuery: the mountain\nResponse:",
                 "Constitution:\n1. Be verbose.\n\nQuery: the mountain\nResponse:"],
                ["The mountain is tall.", "The mountain is tall and old and cold."])]


def _groups(tokenizer) -> list[QueryGroup]:
    return [QueryGroup("q", "x", prompt_ids=p, response_ids=r)
            for p, r in (tokenise_pairs(tokenizer, prompts, responses) for prompts, responses in GROUPS_TEXT)]


def test_learner_sami_loss_and_the_evaluations_mi_bound_agree(tiny_model_dir):
    """Both score a group with the same tokenisation and layout: log C - learner loss == the MI bound."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = load_config(None, ["objective.kl_beta=0"])
    groups_text, groups = GROUPS_TEXT, _groups(tokenizer)
    with torch.no_grad():
        loss, stats = micro_batch_loss(model, None, groups, cfg, scoring_for(cfg, 1),
                                       tokenizer.pad_token_id or tokenizer.eos_token_id, torch.device("cpu"))
    bounds = mi_bounds(HFEngine(str(tiny_model_dir), ModelConfig(name_or_path=str(tiny_model_dir))), groups_text)
    bound = sum(bounds) / len(bounds)
    assert stats["mi_lower_bound"] == pytest.approx(math.log(2) - loss.item(), abs=1e-6)
    assert bound == pytest.approx(stats["mi_lower_bound"], abs=1e-5)
    assert loss.item() != pytest.approx(math.log(2), abs=1e-4)  # a real model separates the pairs a little


def test_health_warnings():
    from sami.metrics import health_warnings

    record = {"loss": 0.7, "loss_per_step": [0.7, 15.0], "groups": 10, "filtered_malformed": 10, "filtered_empty": 0}
    previous = {"groups": 19, "filtered_malformed": 1}
    warnings = health_warnings(record, first_loss=0.69, previous=previous)
    assert warnings[0].startswith("the loss reached 15, 22x the run's first loss 0.69")
    assert warnings[1].startswith("groups kept by the filters fell from 95% to 50%")
    assert health_warnings({**record, "loss_per_step": [0.7, 0.6]}, 0.69, {"groups": 11, "filtered_malformed": 9}) == []


def test_sft_and_kl_terms_read_the_packed_sami_layout(tiny_model_dir):
    """SAMI scores its C x C pairs packed; the SFT term still reads pair (0, 0) and the KL term the same tokens."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    groups, pad = _groups(tokenizer), tokenizer.pad_token_id or tokenizer.eos_token_id
    cpu = torch.device("cpu")
    with torch.no_grad():
        plain = load_config(None, ["objective.kl_beta=0"])
        sami_only, _ = micro_batch_loss(model, None, groups, plain, scoring_for(plain, 1), pad, cpu)
        cfg = load_config(None, ["objective.kl_beta=0.5", "objective.sft_weight=0.25"])
        loss, stats = micro_batch_loss(model, model, groups, cfg, scoring_for(cfg, 1), pad, cpu)  # reference = policy
        # each group's positive pair scored on its own, as one padded sequence
        batch = collate_sequences([g.prompt_ids[0] for g in groups], [g.response_ids[0] for g in groups], pad)
        token_lp = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
    positive_nll = -(token_lp * batch["response_mask"]).sum() / batch["response_mask"].sum()
    assert stats["kl"] == pytest.approx(0.0, abs=1e-7)
    assert positive_nll.item() > 1.0
    assert loss.item() == pytest.approx(sami_only.item() + 0.25 * positive_nll.item(), abs=1e-5)
