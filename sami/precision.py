"""One precision rule for the learner, both rollout engines and the resource plan (no torch: dtype names).

`model.dtype` is the dtype a model runs in, "auto" being bfloat16 on a GPU and float32 on a CPU; the rollout
engines load their weights in it. The learner runs in bfloat16 only under DeepSpeed's bf16 mixed precision,
which keeps a float32 master copy of the weights in the optimiser; without it the optimiser updates the
weights themselves, so they are float32 (bf16 weights would drop every update below their 8-bit mantissa's
resolution).
"""
from __future__ import annotations

from sami.config import TrainConfig


def model_dtype(name: str, use_gpu: bool) -> str:
    """The dtype `model.dtype` names for a model on a GPU (`use_gpu`) or a CPU."""
    if name == "auto":
        return "bfloat16" if use_gpu else "float32"
    return name


def deepspeed_bf16(cfg: TrainConfig, use_gpu: bool) -> bool:
    """DeepSpeed's bf16 mixed precision: as `deepspeed.bf16` says, or (auto) where the learner has a GPU and
    `model.dtype` is bfloat16 there."""
    if cfg.deepspeed.bf16 == "auto":
        return use_gpu and model_dtype(cfg.model.dtype, use_gpu) == "bfloat16"
    return cfg.deepspeed.bf16


def learner_dtype(cfg: TrainConfig, use_gpu: bool) -> str:
    """The dtype the learner loads its policy and reference in and computes in (the MFU's peak is measured in it)."""
    return "bfloat16" if deepspeed_bf16(cfg, use_gpu) else "float32"
