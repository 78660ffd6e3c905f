"""HFEngine and RolloutActor on the tiny model: generation, batching, seeds, weight sync, probe log-probs."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.weight_sync import state_dict_buckets
from sami.rollout_engines import Completion, HFEngine, make_engine
from sami.config import ModelConfig, RolloutConfig, SamplingConfig
from sami.logprobs import collate_sequences, sequence_logprobs, token_logprobs

PROMPTS = [
    "Query: Tell me about the river.\nResponse:",
    "Human: How do I bake bread?",
    "Constitution:\n1. Be polite.\n2. Be concise.\n\nQuery: Tell me about the mountain.\nResponse: Please",
    "Assistant:",
]
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=8, batch_size=4)
TARGET = " the river is long"  # what the trained model must say after any prompt, then EOS


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return HFEngine(str(tiny_model_dir), ModelConfig(dtype="auto"))


@pytest.fixture(scope="module")
def trained(tiny_model_dir):
    """A copy of the tiny model trained to answer TARGET + EOS after every prompt (a few Adam steps)."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    target = tok(TARGET, add_special_tokens=False).input_ids + [tok.eos_token_id]
    prompts = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    batch = collate_sequences(prompts, [target] * len(prompts), tok.pad_token_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(30):
        lp = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
        loss = -sequence_logprobs(lp, batch["response_mask"]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2, f"the tiny model did not learn the target (loss {loss.item():.3f})"
    return model.eval(), tok, target[:-1]


def direct_logprob(model, prompt_ids, response_ids, pad_id) -> float:
    batch = collate_sequences([prompt_ids], [response_ids], pad_id)
    with torch.no_grad():
        return sequence_logprobs(token_logprobs(model, batch["input_ids"], batch["attention_mask"]), batch["response_mask"]).item()


def test_generate_shapes_and_length_finish(engine):
    # fp32 on CPU (dtype auto), random weights: 8 tokens of noise, no EOS
    assert engine.model.dtype == torch.float32
    out = engine.generate(PROMPTS, GREEDY, 0)
    assert len(out) == len(PROMPTS) and all(isinstance(c, Completion) for c in out)
    for c in out:
        assert c.finish_reason == "length" and len(c.token_ids) == 8
        assert engine.tokenizer.eos_token_id not in c.token_ids
        assert c.text == engine.tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_engines_follow_the_one_precision_rule(tiny_model_dir):
    from sami.precision import model_dtype

    assert [model_dtype("auto", use_gpu) for use_gpu in (False, True)] == ["float32", "bfloat16"]
    assert [model_dtype("float16", use_gpu) for use_gpu in (False, True)] == ["float16", "float16"]
    assert HFEngine(str(tiny_model_dir), ModelConfig(dtype="bfloat16"), device="cpu").dtype == torch.bfloat16


def test_stop_cuts_at_first_eos(engine):
    eos, pad = engine.tokenizer.eos_token_id, engine.tokenizer.pad_token_id
    assert engine._completion([10, 11, eos, pad, pad]) == Completion(engine.tokenizer.decode([10, 11]), [10, 11], "stop",
                                                                      eos)
    assert engine._completion([eos, 12]).token_ids == [] and engine._completion([eos]).finish_reason == "stop"
    engine.stop_ids.add(12)  # a generation config's own end token (Llama 3's <|eot_id|>) is the one sampled
    try:
        assert engine._completion([10, 12, eos]).end_id == 12
    finally:
        engine.stop_ids.discard(12)
    cut = engine._completion([10, 11, 12])  # max_new_tokens reached: the training sequence still ends with EOS
    assert (cut.finish_reason, cut.end_id) == ("length", eos)


def test_left_padded_batch_equals_one_by_one_greedy(engine):
    batched = engine.generate(PROMPTS, GREEDY, 0)
    single = [engine.generate([p], GREEDY, 0)[0] for p in PROMPTS]
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
    # a batch_size smaller than the prompt count splits the call and changes nothing
    split = engine.generate(PROMPTS, GREEDY.model_copy(update={"batch_size": 3}), 0)
    assert [c.token_ids for c in split] == [c.token_ids for c in batched]


def test_sampling_is_deterministic_per_seed(engine):
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=8, batch_size=4)
    first = engine.generate(PROMPTS, sampling, 7)
    torch.rand(100)  # global RNG activity in between must not matter
    again = engine.generate(PROMPTS, sampling, 7)
    other = engine.generate(PROMPTS, sampling, 8)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]
    # a tiny nucleus (top_p) leaves only the argmax token, so sampling turns greedy
    nucleus = engine.generate(PROMPTS, sampling.model_copy(update={"top_p": 1e-6}), 7)
    assert [c.token_ids for c in nucleus] == [c.token_ids for c in engine.generate(PROMPTS, GREEDY, 0)]


def test_a_prompts_sample_depends_on_its_own_seed_not_its_batch(engine):
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=8, batch_size=4)
    seeds = [11, 12, 13, 14]
    batched = engine.generate(PROMPTS, sampling, seeds)
    alone = [engine.generate([p], sampling, [s])[0] for p, s in zip(PROMPTS, seeds)]
    reordered = engine.generate(PROMPTS[::-1], sampling, seeds[::-1])[::-1]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone] == [c.token_ids for c in reordered]
    # the same prompt under different seeds gives different samples
    assert len({tuple(c.token_ids) for c in engine.generate([PROMPTS[0]] * 4, sampling, seeds)}) > 1


def test_seeded_sampler_draws_from_the_tempered_nucleus():
    """Gumbel-max: the argmax of the perturbed scores is a draw from softmax(logits / T), cut at top_p."""
    from sami.rollout_engines import SeededSampler

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    counts = torch.zeros(4)
    for seed in range(4000):
        counts[SeededSampler([seed], SamplingConfig(temperature=2.0), "cpu")(None, logits).argmax()] += 1
    expected = torch.softmax(logits[0] / 2.0, dim=0)  # 0.4754, 0.2883, 0.1749, 0.1061
    assert torch.allclose(counts / 4000, expected, atol=0.025)
    # top_p 0.7 at T=1: probabilities 0.644, 0.237, ...: the first two reach it, the rest are never drawn
    nucleus = SamplingConfig(temperature=1.0, top_p=0.7)
    drawn = {SeededSampler([seed], nucleus, "cpu")(None, logits).argmax().item() for seed in range(500)}
    assert drawn == {0, 1}


def test_long_prompt_keeps_its_end(tiny_model_dir):
    engine = HFEngine(str(tiny_model_dir), ModelConfig(max_prompt_tokens=8))
    long_prompt = "the a an and of to in is it you that he was for on are " + PROMPTS[0]
    tail = engine.tokenizer(long_prompt, add_special_tokens=False).input_ids[-8:]
    assert engine.generate([long_prompt], GREEDY, 0)[0].token_ids == engine.generate(
        [engine.tokenizer.decode(tail)], GREEDY, 0)[0].token_ids


def test_update_weights_changes_outputs_and_probe_matches(tiny_model_dir, trained):
    model, tok, target = trained
    engine = HFEngine(str(tiny_model_dir), ModelConfig())
    prompt_ids = tok(PROMPTS[0], add_special_tokens=False).input_ids
    before = engine.sequence_logprob(prompt_ids, target)
    assert engine.generate(PROMPTS, GREEDY, 0)[0].text != TARGET.strip()

    engine.update_weights(state_dict_buckets(model.named_parameters(), bucket_mb=1))

    for c in engine.generate(PROMPTS, GREEDY, 0):
        assert (c.text, c.token_ids, c.finish_reason) == (TARGET.strip(), target, "stop")
    after = engine.sequence_logprob(prompt_ids, target)
    assert after == pytest.approx(direct_logprob(model, prompt_ids, target, tok.pad_token_id), abs=1e-6)
    assert after > -0.1 > before  # the trained model is sure of the target; the random one is not


def test_update_weights_rejects_bad_buckets(tiny_model_dir):
    engine = HFEngine(str(tiny_model_dir), ModelConfig())
    buckets = state_dict_buckets(engine.model.named_parameters(), bucket_mb=1)
    with pytest.raises(KeyError, match="no parameter 'nope'"):
        engine.update_weights([{**buckets[0], "nope": np.zeros(1, np.float32)}])
    name = "model.embed_tokens.weight"
    with pytest.raises(ValueError, match=name):
        engine.update_weights([{**buckets[0], name: buckets[0][name][:-1]}])
    with pytest.raises(KeyError, match="not in the buckets"):
        engine.update_weights([{k: v for k, v in buckets[0].items() if k != name}])


def test_buckets_respect_the_size_limit_and_round_trip():
    mib = 2**20
    tensors = [(f"w{i}", torch.randn(mib // 4 * 2 // 5)) for i in range(5)]  # 0.4 MiB each (float32)
    tensors.insert(2, ("big", torch.randn(mib // 4 * 3 // 2).to(torch.bfloat16)))  # 1.5 MiB once float32
    buckets = state_dict_buckets(tensors, bucket_mb=1)
    assert [list(b) for b in buckets] == [["w0", "w1"], ["big"], ["w2", "w3"], ["w4"]]
    for bucket in buckets:
        assert sum(a.nbytes for a in bucket.values()) <= mib or len(bucket) == 1
    merged = {k: v for b in buckets for k, v in b.items()}
    for name, tensor in tensors:
        assert merged[name].dtype == np.float32
        np.testing.assert_array_equal(merged[name], tensor.float().numpy())


def test_make_engine_picks_and_guards(tiny_model_dir):
    assert isinstance(make_engine(str(tiny_model_dir), RolloutConfig(engine="hf"), ModelConfig()), HFEngine)
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="install the `vllm` extra"):
            make_engine(str(tiny_model_dir), RolloutConfig(engine="vllm"), ModelConfig())


@pytest.mark.timeout(120)
def test_rollout_actor_syncs_through_one_object_ref(tiny_model_dir, trained):
    ray = pytest.importorskip("ray")
    from actors.rollout import start_rollout_actors

    model, tok, target = trained
    cfg = RolloutConfig(engine="hf", cpus_per_engine=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        (actor,), (group,) = start_rollout_actors(str(tiny_model_dir), cfg, ModelConfig())
        assert group.bundles == [{"CPU": 1}]  # an hf engine takes no GPU unless asked
        prompt_ids = tok(PROMPTS[1], add_special_tokens=False).input_ids
        buckets = state_dict_buckets(model.named_parameters(), bucket_mb=1)
        ref = ray.put(buckets)  # all buckets in one object: one control call per sync
        result = ray.get(actor.update_weights.remote(ref), timeout=60)
        assert result["bytes"] == sum(p.numel() * 4 for p in model.parameters())
        assert 0 < result["seconds"] < 10
        probe = ray.get(actor.sequence_logprob.remote(prompt_ids, target), timeout=60)
        assert probe == pytest.approx(direct_logprob(model, prompt_ids, target, tok.pad_token_id), abs=1e-5)
        out = ray.get(actor.generate.remote(PROMPTS[:2], GREEDY, 0), timeout=60)
        assert out["incarnation"] == result["incarnation"] == ray.get(actor.whoami.remote())
        assert [c["text"] for c in out["completions"]] == [TARGET.strip()] * 2
        assert out["completions"][0]["finish_reason"] == "stop"
        ray.get(actor.reset_prefix_cache.remote(), timeout=30)
    finally:
        ray.shutdown()


@pytest.mark.timeout(180)
def test_a_restarted_engine_gets_the_current_weights_back(tiny_model_dir, trained):
    """Kill a rollout actor (Ray restarts it from the weights on disk): the batch it lost is generated again
    after the engine got the synced weights and passed the probe check, and the output is the synced model's."""
    ray = pytest.importorskip("ray")
    from actors.rollout import RolloutEngineError, generate_on_engines, start_rollout_actors
    from actors.weight_sync import WeightSync

    model, tok, target = trained
    cfg = RolloutConfig(engine="hf", cpus_per_engine=1, probe_tolerance=1e-4, max_engine_failures=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        (actor,), _ = start_rollout_actors(str(tiny_model_dir), cfg, ModelConfig())
        sync = WeightSync([actor], cfg, zero_stage=2, rank=0, use_nccl=False)
        sync.push(model)
        probe = (tok(PROMPTS[1], add_special_tokens=False).input_ids, target)
        sync.verify(direct_logprob(model, *probe, tok.pad_token_id), probe)
        before = list(sync.incarnations)
        ray.kill(actor, no_restart=False)
        texts = [c["text"] for c in generate_on_engines([actor], [PROMPTS[:2], PROMPTS[2:]], GREEDY, [0, 1],
                                                        sync.incarnations, sync.recover, cfg.max_engine_failures)]
        assert texts == [TARGET.strip()] * len(PROMPTS)  # the trained model's answer: the base model says something else
        assert sync.incarnations != before and len(sync.restarts) == 1
        assert sync.restarts[0]["probe_abs_diff"] <= 1e-4
        ray.kill(actor, no_restart=False)  # a second failure in one call is more than max_engine_failures=1
        sync.restarts.clear()
        with pytest.raises(RolloutEngineError, match="rollout engine 0 failed 2 time"):
            generate_on_engines([actor], [PROMPTS[:1]] * 3, GREEDY, [0, 1, 2], sync.incarnations,
                                lambda e: ray.kill(actor, no_restart=False), cfg.max_engine_failures)
    finally:
        ray.shutdown()


def test_vllm_request_seeds_differ_per_prompt_and_reproduce():
    from sami.rollout_engines import request_seeds

    seeds = request_seeds(7, 64)
    assert len(set(seeds)) == 64 and seeds == request_seeds(7, 64)
    assert not set(seeds) & set(request_seeds(8, 64))  # neighbouring call seeds share no request seed


def test_vllm_context_holds_prompt_response_eos_and_the_scored_token():
    from sami.rollout_engines import max_model_len

    # a probe of 64 + 32 + 1 tokens is a vLLM prompt that must stay below max_model_len
    assert max_model_len(ModelConfig(max_prompt_tokens=64, max_response_tokens=32)) == 98


def test_object_store_buckets_survive_msgpack():
    """collective_rpc msgpack-encodes its arguments without numpy types (arrays arrive as lists)."""
    import msgpack

    from sami.rollout_engines import decode_bucket, encode_bucket

    bucket = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1.5], dtype=np.float32)}
    assert isinstance(msgpack.unpackb(msgpack.packb(bucket["a.weight"].tolist())), list)
    decoded = decode_bucket(msgpack.unpackb(msgpack.packb(encode_bucket(bucket))))
    assert [n for n, _ in decoded] == ["a.weight", "b"]
    for (_, tensor), array in zip(decoded, bucket.values()):
        assert tensor.dtype == torch.float32 and np.array_equal(tensor.numpy(), array)


def test_probe_tolerance_by_precision_unless_set():
    from actors.weight_sync import PROBE_TOLERANCE, packed_wire, probe_tolerance

    rollout = RolloutConfig()
    assert probe_tolerance(rollout, {torch.float32}) == PROBE_TOLERANCE[torch.float32] == 1e-4
    assert probe_tolerance(rollout, {torch.float32, torch.bfloat16}) == PROBE_TOLERANCE[torch.bfloat16]
    assert probe_tolerance(RolloutConfig(probe_tolerance=3e-3), {torch.bfloat16}) == 3e-3
    assert packed_wire(RolloutConfig(sync_bucket_mb=8)) == {"packed": True, "packed_buffer_size_bytes": 8 * 2**20,
                                                            "packed_num_buffers": 2}


@pytest.mark.parametrize("tp", [1, 4])
def test_a_vllm_engine_reserves_its_gpus_once(tp):
    from actors.rollout import vllm_bundles, vllm_holder_options

    # the group holds tp GPUs; the holder adds none for TP > 1 (its workers sit in the bundles) and, for
    # TP = 1, takes the one bundle's GPU
    assert sum(b["GPU"] for b in vllm_bundles(tp)) == tp
    assert vllm_holder_options(tp)["num_gpus"] == (1 if tp == 1 else 0)
