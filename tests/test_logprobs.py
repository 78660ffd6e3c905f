"""Chunked response log-probs agree with a naive full log_softmax and use less memory."""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from sami.logprobs import collate_sequences, sequence_logprobs, token_logprobs


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
