"""Every use of DeepSpeed beyond its public API, in one place (DeepSpeed 0.19.8): an upgrade that moves one of
these fails here, in `tests/test_deepspeed_compat.py`, with one message."""
from __future__ import annotations

import torch

# Attributes ZeRO-3 stores on each submodule the first time an engine wraps it (runtime/zero/parameter_offload.py
# 453-526): autograd functions bound to *that* engine, which a later engine reuses whenever they are present.
ZERO3_MODULE_FUNCTIONS = ("pre_bwd_fn", "post_bwd_fn", "applied_pre_backward_ref_cnt", "ds_grads_remaining")


def skip_cpu_shm_comm_op() -> None:
    """On CPU DeepSpeed JIT-builds a shared-memory all-reduce op (~50 s, 1.5 GB); gloo does the job."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def forget_zero3_module_functions(module: torch.nn.Module) -> None:
    """After `engine.destroy()`: drop the backward functions ZeRO-3 left on `module`'s submodules, so the next engine
    makes its own. `destroy()` removes the hooks but not these, and a new engine's backward then fetches parameters
    through the destroyed engine's coordinator (measured: a LoRA policy's LM head recomputed in the backward pass
    with its weight still partitioned, `CheckpointError ... shape [0]`, at the second `init: base` iteration)."""
    for sub in module.modules():
        for name in ZERO3_MODULE_FUNCTIONS:
            sub.__dict__.pop(name, None)


def zero3_full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole 16-bit state dict of a ZeRO-3 engine's module, gathered layer by layer (every rank takes part;
    rank 0 gets it, the others None)."""
    return engine._zero3_consolidated_16bit_state_dict()
