"""Training throughput: model FLOPs of the learner's passes and the device's measured matmul peak, for MFU.

What is counted (the usual approximation, Kaplan et al. 2020): a forward pass costs 2 x N FLOPs per token
and forward + backward 6 x N, N being the parameters that multiply activations (`matmul_parameters`).
Attention's T^2 term is not counted, and neither is the LM head skipping prompt tokens in the packed SAMI
layout, so the figure is an estimate; tokens are real tokens, never padding. The peak is measured, not
looked up: the best rate of a square matmul of random operands on the learner's device (float32 on a CPU,
bfloat16 on a GPU), timed with CUDA events on a GPU.
"""
from __future__ import annotations

import time

import torch


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters that multiply activations: all but the input embedding (a lookup), unless the LM head shares
    that matrix (tied embeddings), in which case it is a matmul there and counted once."""
    total = sum(p.numel() for p in model.parameters())
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    return total if tied else total - embedding.weight.numel()


def training_flops(parameters: int, trained_tokens: int, reference_tokens: int = 0) -> float:
    """Model FLOPs: forward + backward of the policy on `trained_tokens`, forward of a frozen reference on
    `reference_tokens` (the KL / DPO reference has the policy's shape)."""
    return 6.0 * parameters * trained_tokens + 2.0 * parameters * reference_tokens


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` `size` x `size` matmuls of random operands on `device`, after one
    untimed warm-up (it pays for allocation and kernel selection); by default 1024 on a CPU (well under a
    second) and 8192 on a GPU (smaller ones leave its tensor cores idle)."""
    size = size or (8192 if device.type == "cuda" else 1024)
    # Random operands: a matmul of constants or zeros runs faster than one of real data (an H200: 894 TFLOP/s on
    # zeros, 788 on random data), which would inflate the MFU denominator. Their own generator leaves the run's
    # random streams untouched.
    generator = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(size, size, device=device, dtype=dtype, generator=generator) for _ in range(2))
    seconds = [matmul_seconds(a, b) for _ in range(repeats + 1)][1:]
    return 2.0 * size**3 / min(seconds)


def matmul_seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    """Seconds of one `a @ b`: CUDA events on a GPU (the host clock would time the launch and the
    synchronisation too), the host clock on a CPU."""
    if a.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds
    started = time.perf_counter()
    torch.mm(a, b)
    return time.perf_counter() - started


def throughput_figures(real_tokens: int, padded_tokens: int, model_flops: float, peak_flops: float,
                       seconds: float) -> dict:
    """The learner's rates over `seconds`; every count and the peak summed over the learner ranks."""
    return {"learner_tokens_per_second": real_tokens / seconds,
            "learner_padded_tokens_per_second": padded_tokens / seconds,
            "model_flops_per_second": model_flops / seconds,
            "peak_flops": peak_flops,
            "mfu": model_flops / seconds / peak_flops}
