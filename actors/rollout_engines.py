"""Rollout engines behind one interface: `hf` (transformers generate, CPU or GPU) and `vllm` (GPU).

The training loop only sees `RolloutEngine`: generate completions, take new weights in buckets, score a
probe sequence (to verify a sync), reset the prefix cache. vLLM is an optional extra; importing this
module never needs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from pipelines.config import ModelConfig, RolloutConfig, SamplingConfig
from pipelines.logprobs import collate_sequences, sequence_logprobs, token_logprobs


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS produced) or "length" (max_new_tokens reached)


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def state_dict_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_mb: int) -> list[dict[str, np.ndarray]]:
    """Split parameters into buckets of at most `bucket_mb` MiB (one oversized tensor gets its own bucket)."""
    limit = bucket_mb * 2**20
    buckets: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, tensor in named_tensors:
        # numpy has no bfloat16: ship float32 (weights are cast back to the engine's dtype on load)
        array = tensor.detach().to("cpu", torch.float32).numpy()
        if buckets[-1] and size + array.nbytes > limit:
            buckets.append({})
            size = 0
        buckets[-1][name] = array
        size += array.nbytes
    return buckets


class RolloutEngine:
    def generate(self, prompts: list[str], sampling: SamplingConfig, seed: int) -> list[Completion]:
        raise NotImplementedError

    def update_weights(self, buckets: list[dict[str, np.ndarray]]) -> None:
        raise NotImplementedError

    def sequence_logprob(self, prompt_ids: list[int], response_ids: list[int]) -> float:
        raise NotImplementedError

    def reset_prefix_cache(self) -> None:
        raise NotImplementedError


class HFEngine(RolloutEngine):
    """transformers `generate`, batched with left padding; weights updated in place, never reloaded."""

    def __init__(self, model_path: str, model_cfg: ModelConfig, device: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(
            model_cfg.tokenizer or model_path, trust_remote_code=model_cfg.trust_remote_code
        )
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=resolve_dtype(model_cfg.dtype), trust_remote_code=model_cfg.trust_remote_code
        ).to(self.device).eval()
        self.max_prompt_tokens = model_cfg.max_prompt_tokens

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: SamplingConfig, seed: int) -> list[Completion]:
        torch.manual_seed(seed)
        eos = self.tokenizer.eos_token_id
        completions = []
        for start in range(0, len(prompts), sampling.batch_size):
            enc = self.tokenizer(
                prompts[start : start + sampling.batch_size], return_tensors="pt", padding=True,
                truncation=True, max_length=self.max_prompt_tokens, add_special_tokens=False,
            ).to(self.device)
            greedy = sampling.temperature == 0.0
            out = self.model.generate(
                **enc,
                do_sample=not greedy,
                temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p,
                top_k=None,
                max_new_tokens=sampling.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=eos,
            )
            for row in out[:, enc.input_ids.shape[1] :].tolist():
                if eos in row:
                    ids, reason = row[: row.index(eos)], "stop"
                else:
                    ids, reason = row, "length"
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                completions.append(Completion(text, ids, reason))
        return completions

    @torch.no_grad()
    def update_weights(self, buckets: list[dict[str, np.ndarray]]) -> None:
        params = dict(self.model.named_parameters())
        for bucket in buckets:
            for name, array in bucket.items():
                if name not in params:
                    raise KeyError(f"weight sync: the rollout model has no parameter {name!r}")
                params[name].copy_(torch.from_numpy(array))

    @torch.no_grad()
    def sequence_logprob(self, prompt_ids: list[int], response_ids: list[int]) -> float:
        batch = collate_sequences([prompt_ids], [response_ids], self.tokenizer.pad_token_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        token_lp = token_logprobs(self.model, batch["input_ids"], batch["attention_mask"])
        return sequence_logprobs(token_lp, batch["response_mask"]).item()

    def reset_prefix_cache(self) -> None:
        """HF generate keeps no cache between calls."""


class VLLMEngine(RolloutEngine):
    """vLLM 0.33 (`pip install -e .[vllm]` on a GPU node), token-in/token-out.

    Weight sync on GPU: learner rank 0 broadcasts buckets over NCCL into the workers through
    `actors.vllm_sync.WeightSyncExtension` (passed as `worker_extension_cls`); `update_weights` is the
    object-store path, loading buckets through `collective_rpc` into `model.load_weights`.
    """

    def __init__(self, model_path: str, model_cfg: ModelConfig, rollout_cfg: RolloutConfig):
        try:
            from vllm import LLM
        except ImportError as e:
            raise RuntimeError(
                "rollout.engine is 'vllm' but vLLM is not installed; on a GPU node run `pip install -e .[vllm]` "
                "(or use rollout.engine=hf)"
            ) from e
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(
            model_cfg.tokenizer or model_path, trust_remote_code=model_cfg.trust_remote_code
        )
        self.llm = LLM(
            model=model_path,
            tokenizer=model_cfg.tokenizer or model_path,
            dtype="bfloat16" if model_cfg.dtype == "auto" else model_cfg.dtype,
            tensor_parallel_size=rollout_cfg.tensor_parallel_size,
            distributed_executor_backend="ray" if rollout_cfg.tensor_parallel_size > 1 else None,
            gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
            enable_prefix_caching=rollout_cfg.enable_prefix_caching,
            trust_remote_code=model_cfg.trust_remote_code,
            max_model_len=model_cfg.max_prompt_tokens + model_cfg.max_response_tokens,
            worker_extension_cls="actors.vllm_sync.WeightSyncExtension",
        )
        self.max_prompt_tokens = model_cfg.max_prompt_tokens

    def generate(self, prompts: list[str], sampling: SamplingConfig, seed: int) -> list[Completion]:
        from vllm import SamplingParams, TokensPrompt

        token_prompts = [
            TokensPrompt(prompt_token_ids=self.tokenizer(p, add_special_tokens=False).input_ids[-self.max_prompt_tokens :])
            for p in prompts
        ]
        params = SamplingParams(
            temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_new_tokens, seed=seed
        )
        outputs = self.llm.generate(token_prompts, params, use_tqdm=False)
        return [
            Completion(o.outputs[0].text, list(o.outputs[0].token_ids), "length" if o.outputs[0].finish_reason == "length" else "stop")
            for o in outputs
        ]

    def update_weights(self, buckets: list[dict[str, np.ndarray]]) -> None:
        for bucket in buckets:
            self.llm.collective_rpc("load_weights_from_arrays", args=(bucket,))
        self.reset_prefix_cache()

    def sequence_logprob(self, prompt_ids: list[int], response_ids: list[int]) -> float:
        from vllm import SamplingParams, TokensPrompt

        # prompt_logprobs=0 returns the log-prob of each given token; the response's are the last ones
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        out = self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids + response_ids), params, use_tqdm=False)[0]
        scored = out.prompt_logprobs[len(prompt_ids) :]
        values = [entry[tok].logprob for entry, tok in zip(scored, response_ids)]
        return float(np.mean(values))

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()


def make_engine(model_path: str, rollout_cfg: RolloutConfig, model_cfg: ModelConfig) -> RolloutEngine:
    if rollout_cfg.engine == "hf":
        return HFEngine(model_path, model_cfg)
    if rollout_cfg.engine == "vllm":
        return VLLMEngine(model_path, model_cfg, rollout_cfg)
    raise ValueError(f"unknown rollout engine {rollout_cfg.engine!r}; use 'hf' or 'vllm'")
