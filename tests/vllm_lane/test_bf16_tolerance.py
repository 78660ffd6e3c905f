"""The probe check's bf16 tolerance against the real engine: vLLM in bf16 vs the learner's scoring of the same
bf16 weights, on a model trained until its predictions are sharp (random weights give near-uniform
distributions, which hide rounding). In-process and eager, to keep the lane's engine starts short."""
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.weight_sync import PROBE_TOLERANCE
from lane import TRAIN_TEXTS, learner_logprob
from sami.config import ModelConfig, RolloutConfig
from sami.logprobs import collate_sequences, sequence_logprobs, token_logprobs
from sami.rollout_engines import VLLMEngine
from sami.tiny_model import build_tiny_model, train_tokenizer


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    tok = train_tokenizer(TRAIN_TEXTS, vocab_size=500)
    build_tiny_model(out, tok, hidden_size=64, num_layers=2, num_heads=2, seed=0)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = [tok(t, add_special_tokens=False).input_ids for t in TRAIN_TEXTS]
    batch = collate_sequences([i[:1] for i in ids], [i[1:] for i in ids], tok.pad_token_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(60):
        loss = -sequence_logprobs(token_logprobs(model, batch["input_ids"], batch["attention_mask"]),
                                  batch["response_mask"]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2
    model.save_pretrained(out)
    return out


def test_bf16_logprobs_stay_within_the_stated_tolerance(trained_dir, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    engine = VLLMEngine(str(trained_dir), ModelConfig(dtype="bfloat16", max_prompt_tokens=64, max_response_tokens=64),
                        RolloutConfig(engine="vllm", gpu_memory_utilization=0.2, enforce_eager=True))
    tok = AutoTokenizer.from_pretrained(trained_dir)
    learner = AutoModelForCausalLM.from_pretrained(trained_dir, dtype=torch.bfloat16)
    rng, diffs = random.Random(0), []
    for i in range(16):
        tokens = tok(TRAIN_TEXTS[i % len(TRAIN_TEXTS)], add_special_tokens=False).input_ids
        cut = rng.randrange(2, len(tokens) - 2)
        p, r = tokens[:cut], tokens[cut:]
        if i >= 8:  # unlikely continuations, where bf16 rounding shows most
            r = [rng.randrange(5, len(tok)) for _ in r]
        r = r + [tok.eos_token_id]
        diffs.append(abs(engine.sequence_logprob(p, r) - learner_logprob(learner, p, r, tok.pad_token_id)))
    print(f"bf16 |vLLM - learner| over {len(diffs)} probes: max {max(diffs):.2e}, mean {sum(diffs) / len(diffs):.2e}")
    assert max(diffs) > 1e-5  # bf16 really differs: the fp32 bound would abort runs
    assert max(diffs) < PROBE_TOLERANCE[torch.bfloat16]
