"""Chunked response log-probs agree with a naive full log_softmax and use less memory; shared-prefix scoring
agrees with scoring every (prompt, response) pair on its own."""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from sami.groups import QueryGroup

from sami.logprobs import (block_attention_mask, collate_sequences, pack_groups, sequence_logprobs,
                           shared_prefix_logprobs, token_logprobs)
from sami.objectives import OBJECTIVES, pair_sequences, sami_loss


def naive_token_logprobs(model, input_ids, attention_mask):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def test_collate_masks_prompt_padding_and_optionally_eos():
    batch = collate_sequences([[5, 6, 7], [8]], [[9, 2], [10, 11, 2]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 2], [8, 10, 11, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # response_mask[t] marks token t+1: responses start at index 3 and 1
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    no_eos = collate_sequences([[5, 6, 7], [8]], [[9, 2], [10, 11, 2]], pad_id=0, include_eos=False)
    assert no_eos["response_mask"].tolist() == [[0, 0, 1, 0], [1, 1, 0, 0]]
    with pytest.raises(ValueError, match="empty prompt"):
        collate_sequences([[]], [[1]], pad_id=0)


def test_agrees_with_naive_log_softmax_on_tiny_model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = collate_sequences([[3, 4, 5, 6], [7, 8]], [[9, 10, 2], [11, 12, 13, 14, 2]], pad_id=0)
    with torch.no_grad():
        chunked = token_logprobs(model, batch["input_ids"], batch["attention_mask"], chunk_size=2)
        naive = naive_token_logprobs(model, batch["input_ids"], batch["attention_mask"])
    mask = batch["response_mask"].bool()
    assert torch.allclose(chunked[mask], naive[mask], atol=1e-5)
    mean = sequence_logprobs(chunked, batch["response_mask"], "mean")
    total = sequence_logprobs(chunked, batch["response_mask"], "sum")
    assert total[0].item() == pytest.approx(naive[0, 3:6].sum().item(), abs=1e-5)
    assert mean[1].item() == pytest.approx(naive[1, 1:6].mean().item(), abs=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        sequence_logprobs(chunked, batch["response_mask"], "max")


def test_gradients_match_naive(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = collate_sequences([[3, 4, 5]], [[9, 10, 2]], pad_id=0)
    grads = []
    for fn in (lambda: token_logprobs(model, batch["input_ids"], batch["attention_mask"], chunk_size=1),
               lambda: naive_token_logprobs(model, batch["input_ids"], batch["attention_mask"])):
        model.zero_grad()
        sequence_logprobs(fn(), batch["response_mask"]).sum().backward()
        grads.append(model.lm_head.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_pack_groups_runs_each_prompt_once_with_every_response():
    batch = pack_groups([([[5, 6], [7]], [[9, 2], [10, 11, 2]])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 9, 2, 10, 11, 2], [7, 9, 2, 10, 11, 2, 0]]
    # every response starts where it would right after its prompt
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 4], [0, 1, 2, 1, 2, 3, 0]]
    assert batch["segment"].tolist() == [[0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 2, 2, 2, -1]]
    assert batch["response_mask"].tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]]
    # pair (prompt 1, response 1) is row 3: its tokens 10, 11, 2 are predicted at the prompt's last token (0),
    # then at its own previous tokens (3, 4) of packed sequence 1
    scored = list(zip(*(batch[k].tolist() for k in ("seq", "pos", "label", "row", "col"))))
    assert [s for s in scored if s[3] == 3] == [(1, 0, 10, 3, 0), (1, 3, 11, 3, 1), (1, 4, 2, 3, 2)]
    allowed = block_attention_mask(batch["segment"], torch.float32)[1, 0] == 0
    assert allowed[3].tolist() == [True, False, False, True, False, False, False]  # prompt and itself, not response 0
    assert allowed[6].tolist() == [True] + [False] * 5 + [True]  # padding sees the prompt and itself: no empty row
    no_eos = pack_groups([([[5, 6], [7]], [[9, 2], [10, 11, 2]])], pad_id=0, include_eos=False)
    assert no_eos["response_mask"].tolist() == [[1, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 0]]


def _sami_matrix_and_grads(model, groups, score):
    model.zero_grad()
    c = len(groups[0][0])
    token_lp, mask = score(groups)
    matrix = sequence_logprobs(token_lp, mask).view(len(groups), c, c)
    sami_loss(matrix).loss.backward()
    return matrix.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("c", [2, 3])
@pytest.mark.parametrize("include_eos", [True, False])
def test_shared_prefix_matches_every_pair_on_its_own(tiny_model_dir, c, include_eos):
    """The C x C matrix and the SAMI loss's gradient equal those of C^2 right-padded sequences (fp32)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(c)

    def ids(n):
        return torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist()

    # prompts and responses of different lengths: padding in both layouts
    groups = [([ids(4 + 3 * i + g) for i in range(c)], [ids(2 + 2 * j + g) + [2] for j in range(c)]) for g in range(2)]

    def padded(groups):
        prompts, responses = pair_sequences([QueryGroup("q", "x", prompt_ids=p, response_ids=r) for p, r in groups],
                                            OBJECTIVES["sami"].pairs(c))
        batch = collate_sequences(prompts, responses, pad_id=0, include_eos=include_eos)
        return token_logprobs(model, batch["input_ids"], batch["attention_mask"]), batch["response_mask"]

    def shared(groups):
        return shared_prefix_logprobs(model, groups, pad_id=0, include_eos=include_eos, chunk_size=7)

    want, want_grads = _sami_matrix_and_grads(model, groups, padded)
    got, got_grads = _sami_matrix_and_grads(model, groups, shared)
    assert got.shape == (2, c, c) and want.std() > 0.03  # a real matrix, not a constant
    assert torch.allclose(got, want, rtol=0, atol=1e-5), (got - want).abs().max()
    assert all(want_grads[n].abs().max() > 0 for n in want_grads)
    for name in want_grads:
        assert torch.allclose(got_grads[name], want_grads[name], rtol=0, atol=1e-5), name


class PeakTensorBytes(TorchDispatchMode):
    """The peak of live tensor storage allocated inside the block, counted op by op (exact, whatever else the
    machine does; the process high-water mark was not: it under-read under memory pressure)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, set()

    def _release(self, nbytes):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (x for x in torch.utils._pytree.tree_leaves(out) if isinstance(x, torch.Tensor)):
            storage = t.untyped_storage()
            if storage.data_ptr() in self.seen or storage.nbytes() == 0:
                continue  # a view of, or the same storage as, something already counted
            self.seen.add(storage.data_ptr())
            self.live += storage.nbytes()
            weakref.finalize(storage, self._release, storage.nbytes())
            weakref.finalize(storage, self.seen.discard, storage.data_ptr())
        self.peak = max(self.peak, self.live)
        return out


def _peak_bytes(score) -> int:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, 32000, (1, 1024))
    with torch.no_grad(), PeakTensorBytes() as meter:
        score(model, ids, torch.ones_like(ids))
    return meter.peak


def test_peak_memory_is_lower_on_long_sequence_with_large_vocab():
    naive = _peak_bytes(naive_token_logprobs)
    chunked = _peak_bytes(lambda model, ids, mask: token_logprobs(model, ids, mask, chunk_size=64))
    full_fp32 = 1024 * 32000 * 4  # one [T, V] float32 tensor: 131 MB
    assert naive > full_fp32, naive
    assert chunked < full_fp32 and chunked * 2 < naive, (chunked, naive)


def test_exact_kl_matches_the_full_vocabulary_sum_and_its_gradient(tiny_model_dir):
    """token_kl[n, t] = sum_v p(v) (log p(v) - log p_ref(v)) at each response position, gradient through p only."""
    from sami.logprobs import shared_prefix_logprobs_and_kl

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).requires_grad_(False)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    groups = [([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]])]
    token_lp, mask, token_kl = shared_prefix_logprobs_and_kl(model, reference, groups, pad_id=0, chunk_size=3)
    assert torch.allclose(token_lp, shared_prefix_logprobs(model, groups, pad_id=0)[0], atol=1e-6)
    # row (i=1, j=0): prompt [8, 9], response [10, 11]; position t predicts response token t
    full = torch.tensor([[8, 9, 10, 11]])
    logp = torch.log_softmax(model(full).logits.float(), -1)[0, 1:3]
    ref = torch.log_softmax(reference(full).logits.float(), -1)[0, 1:3]
    expected = (logp.exp() * (logp - ref)).sum(-1)
    assert torch.allclose(token_kl[2, :2], expected, atol=1e-5) and (token_kl[mask.bool()] > 0).all()
    (grad_exact,) = torch.autograd.grad(token_kl[2, :2].sum(), model.lm_head.weight)
    (grad_direct,) = torch.autograd.grad(expected.sum(), model.lm_head.weight)
    assert torch.allclose(grad_exact, grad_direct, atol=1e-5)
