"""What the HF engine's test (test_sampled_ids.py) and the vLLM lane's share: groups planned as training plans them,
answered by an engine, tokenised as the learner tokenises them, and the checks that the learner scores the ids the
engine sampled."""
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from sami.config import ModelConfig, SamplingConfig
from sami.constitutions import sample_constitutions
from sami.groups import (QueryGroup, TrainingSeeds, attach_completions, generation_seeds, padding_id, plan_groups,
                         tokenise_group)
from sami.logprobs import sequence_logprobs
from sami.objectives import scoring
from sami.scoring import score_groups
from sami.world.rules import PRINCIPLES

QUERIES = [{"query_id": f"q{i}", "query": f"Tell me about the river {i}.", "subject": "river"} for i in range(3)]
MAX_PROMPT_TOKENS, MAX_RESPONSE_TOKENS = 256, 12  # no prompt is cut; responses end by max_new_tokens=12 at most
MODEL_CFG = ModelConfig(dtype="float32", max_prompt_tokens=MAX_PROMPT_TOKENS, max_response_tokens=MAX_RESPONSE_TOKENS)
SAMPLING = SamplingConfig(temperature=1.0, max_new_tokens=MAX_RESPONSE_TOKENS, batch_size=6)


def planned_groups() -> list[QueryGroup]:
    """Three queries' groups of C=2, planned as training's iteration 1 plans them."""
    stances = [sample_constitutions(PRINCIPLES, 2, "sample_k", random.Random(f"0/{q['query_id']}"), k=3)
               for q in QUERIES]
    return plan_groups(QUERIES, PRINCIPLES, stances, "world", TrainingSeeds(seed=0, iteration=1))


def answer_and_tokenise(groups: list[QueryGroup], worker, tokenizer) -> list[dict]:
    """The rollout actor's body (`worker`: actors/rollout.py `RolloutWorker`) answers `groups` at temperature 1;
    its completions attached and the groups tokenised for the learner, as the training loop does
    (pipelines/loop.py `build_groups`). Returns the completions."""
    completions = worker.generate([p for g in groups for p in g.generation_prompts], SAMPLING,
                                  [s for g in groups for s in generation_seeds(g, 0, 1)])["completions"]
    attach_completions(groups, completions)
    for g in groups:
        tokenise_group(g, tokenizer, "world", MAX_PROMPT_TOKENS, MAX_RESPONSE_TOKENS)
    return completions


def check_the_learner_scores_what_was_sampled(worker, model_dir, ran: list[list[int]]) -> None:
    """Groups answered by `worker` (serving `model_dir`) and tokenised for the learner score the ids its engine
    sampled, from prompts that began with one BOS (`ran`: the prompt ids the engine reports it generated from, filled
    as it generates), where the old way would have scored other ids; the learner's log-probs of one group are the
    engine's own."""
    tok, groups = worker.engine.tokenizer, planned_groups()
    completions = answer_and_tokenise(groups, worker, tok)
    prompts = [p for g in groups for p in g.generation_prompts]
    assert ran == [tok(p).input_ids for p in prompts] and all(ids.count(tok.bos_token_id) == 1 for ids in ran)
    differ = retokenised_differently(groups, completions, tok)
    print(f"{differ} of {len(completions)} responses tokenised again differ from the sampled ids")
    assert differ >= 1
    # the learner's own scoring (the packed layout SAMI trains with) of the sampled ids
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # the learner's copy
    sami, g = scoring("sami", 2), groups[0]
    with torch.no_grad():
        token_lp, mask, _ = score_groups(model, [g], sami, padding_id(tok), True, torch.device("cpu"))
    assert sequence_logprobs(token_lp, mask).tolist() == pytest.approx(
        [worker.engine.sequence_logprob(g.prompt_ids[i], g.response_ids[j]) for i, j in sami.pairs], abs=1e-5)


def retokenised_differently(groups: list[QueryGroup], completions: list[dict], tokenizer) -> int:
    """Assert the learner's ids are the engine's (responses: the sampled ids and stop token; prompts: the training
    prompts with one BOS in front), and return how many responses the old way (the stripped text tokenised again
    after a space, EOS last) would have scored as other ids than those sampled."""
    bos = tokenizer.bos_token_id
    sampled = [c["token_ids"] + [c["end_id"]] for c in completions]
    assert [ids for g in groups for ids in g.response_ids] == sampled
    for g in groups:
        assert g.prompt_ids == [tokenizer(p).input_ids for p in g.training_prompts("world")]
        assert all(ids[0] == bos and bos not in ids[1:] for ids in g.prompt_ids)
    old = [ids + [tokenizer.eos_token_id] for ids in
           tokenizer([" " + c["text"].strip() for c in completions], add_special_tokens=False).input_ids]
    return sum(o != s for o, s in zip(old, sampled))
