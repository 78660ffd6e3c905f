"""Throughput figures: the FLOPs counted, the measured peak, the learner's token counts per layout."""
import torch
from transformers import AutoModelForCausalLM

from sami.groups import QueryGroup
from sami.scoring import forward_tokens
from sami.logprobs import collate_sequences, pack_groups
from sami.objectives import pair_sequences, scoring
from sami.throughput import matmul_parameters, measure_peak_flops, throughput_figures, training_flops


def test_training_flops_count_forward_backward_and_the_reference_forward():
    assert training_flops(1000, 10) == 6 * 1000 * 10
    assert training_flops(1000, 10, reference_tokens=10) == 8 * 1000 * 10


def test_matmul_parameters_leave_out_the_input_embedding_unless_the_head_shares_it(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert matmul_parameters(model) == (total if tied else total - embedding)
    model.get_output_embeddings().weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    untied_total = sum(p.numel() for p in model.parameters())
    assert matmul_parameters(model) == untied_total - embedding


def test_peak_is_a_measured_matmul_rate():
    peak = measure_peak_flops(torch.device("cpu"), torch.float32, size=256, repeats=2)
    assert 1e7 < peak < 1e15  # a CPU core does 1-100 GFLOP/s in float32


def test_the_peak_multiplies_random_operands_after_a_warm_up(monkeypatch):
    """torch.mm is wrapped (it still runs) only to record what measure_peak_flops multiplies: on a GPU a matmul of
    constants or zeros runs faster than one of real data (an H200: 894 against 788 TFLOP/s), so constant operands
    would inflate the MFU denominator."""
    calls, real_mm = [], torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: calls.append((a, b)) or real_mm(a, b))
    measure_peak_flops(torch.device("cpu"), torch.float32, size=64, repeats=3)
    assert len(calls) == 4  # one untimed warm-up, three timed
    a, b = calls[0]
    assert min(a.unique().numel(), b.unique().numel()) > 0.99 * 64 * 64  # (nearly) every entry its own value
    assert not torch.equal(a, b) and abs(a.mean().item()) < 0.2 and 0.8 < a.std().item() < 1.2


def test_throughput_figures():
    figures = throughput_figures(real_tokens=300, padded_tokens=400, model_flops=6e9, peak_flops=1e10, seconds=2.0)
    assert figures == {"learner_tokens_per_second": 150.0, "learner_padded_tokens_per_second": 200.0,
                       "model_flops_per_second": 3e9, "peak_flops": 1e10, "mfu": 0.3}


def group(prompt_lengths, response_lengths):
    return QueryGroup(query_id="q", query="q", prompt_ids=[[1] * n for n in prompt_lengths],
                      response_ids=[[2] * n for n in response_lengths])


def test_forward_tokens_match_the_batches_the_learner_runs():
    groups = [group([5, 7], [3, 4]), group([6, 2], [9, 1])]
    sami = scoring("sami", 2)
    packed = pack_groups([(g.prompt_ids, g.response_ids) for g in groups], pad_id=0)
    real = int((packed["segment"] >= 0).sum())
    assert forward_tokens(groups, sami) == (real, packed["input_ids"].numel()) == (5 + 7 + 6 + 2 + 2 * 7 + 2 * 10, 4 * 16)
    dpo = scoring("dpo", 2)
    batch = collate_sequences(*pair_sequences(groups, dpo.pairs), pad_id=0)
    assert forward_tokens(groups, dpo) == (int(batch["attention_mask"].sum()), batch["input_ids"].numel())


def test_measuring_the_peak_leaves_the_random_stream_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    measure_peak_flops(torch.device("cpu"), torch.float32, size=64, repeats=1)
    assert torch.equal(torch.rand(3), expected)
