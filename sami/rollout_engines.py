"""Rollout engines behind one interface: `hf` (transformers generate, CPU or GPU) and `vllm` (GPU).

The training loop only sees `RolloutEngine`: generate completions, take new weights in buckets, score a
probe sequence (to verify a sync), reset the prefix cache. vLLM is an optional extra; importing this
module never needs it.

Both engines return a completion's token ids *without* the EOS token (the data stage appends EOS when it
tokenises responses for training) and finish_reason "stop" when EOS ended it, "length" otherwise.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
import numpy as np
import torch

from sami.config import EngineConfig, ModelConfig, SamplingConfig
from sami.logprobs import collate_sequences, sequence_logprobs, token_logprobs


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # the new tokens, EOS excluded
    finish_reason: str  # "stop" (EOS produced) or "length" (max_new_tokens reached)


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class RolloutEngine:
    def generate(self, prompts: list[str], sampling: SamplingConfig, seed: int) -> list[Completion]:
        raise NotImplementedError

    def update_weights(self, buckets: list[dict[str, np.ndarray]]) -> None:
        """The CPU / object-store path: load every parameter from numpy buckets, in place."""
        raise NotImplementedError

    def sequence_logprob(self, prompt_ids: list[int], response_ids: list[int]) -> float:
        """Mean log-prob per response token given the prompt, as the learner computes it."""
        raise NotImplementedError

    def reset_prefix_cache(self) -> None:
        raise NotImplementedError


def _stop_ids(tokenizer, generation_config) -> set[int]:
    """EOS of the tokenizer plus any the model's generation config names (Llama 3 has several)."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(generation_config, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra])
    return {i for i in ids if i is not None}


class HFEngine(RolloutEngine):
    """transformers `generate`, batched with left padding; weights updated in place, never reloaded."""

    def __init__(self, model_path: str, model_cfg: ModelConfig, device: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(
            model_cfg.tokenizer or model_path, trust_remote_code=model_cfg.trust_remote_code
        )
        # Left padding lines up every prompt's last token; left truncation keeps the end of a long prompt.
        self.tokenizer.padding_side = "left"
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=resolve_dtype(model_cfg.dtype), trust_remote_code=model_cfg.trust_remote_code
        ).to(self.device).eval()
        self.max_prompt_tokens = model_cfg.max_prompt_tokens
        self.stop_ids = _stop_ids(self.tokenizer, self.model.generation_config)

    def _generation_config(self, sampling: SamplingConfig):
        """Exactly the requested sampling; the model's own generation defaults (top_k=50, ...) do not leak in."""
        from transformers import GenerationConfig

        greedy = sampling.temperature == 0.0
        return GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else 0,  # 0 = off, as in vLLM
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(self.stop_ids),
        )

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: SamplingConfig, seed: int) -> list[Completion]:
        config = self._generation_config(sampling)
        completions = []
        # a private RNG stream per call: the same (prompts, seed) give the same samples, whatever ran before
        with torch.random.fork_rng(devices=[self.device] if self.device.startswith("cuda") else []):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), sampling.batch_size):
                enc = self.tokenizer(
                    prompts[start : start + sampling.batch_size], return_tensors="pt", padding=True,
                    truncation=True, max_length=self.max_prompt_tokens, add_special_tokens=False,
                ).to(self.device)
                out = self.model.generate(**enc, generation_config=config)
                for row in out[:, enc.input_ids.shape[1] :].tolist():
                    completions.append(self._completion(row))
        return completions

    def _completion(self, new_ids: list[int]) -> Completion:
        stop = next((i for i, tok in enumerate(new_ids) if tok in self.stop_ids), None)
        ids, reason = (new_ids, "length") if stop is None else (new_ids[:stop], "stop")
        return Completion(self.tokenizer.decode(ids, skip_special_tokens=True), ids, reason)

    @torch.no_grad()
    def update_weights(self, buckets: list[dict[str, np.ndarray]]) -> None:
        params = dict(self.model.named_parameters())
        loaded = set()
        for bucket in buckets:
            for name, array in bucket.items():
                if name not in params:
                    raise KeyError(f"weight sync: the rollout model has no parameter {name!r}")
                if tuple(array.shape) != tuple(params[name].shape):
                    raise ValueError(f"weight sync: {name} has shape {tuple(array.shape)}, the rollout model "
                                     f"expects {tuple(params[name].shape)}")
                with warnings.catch_warnings():  # arrays from Ray's object store are read-only; we only read them
                    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                    params[name].copy_(torch.from_numpy(array))
                loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:  # a partial sync would leave stale weights that the probe might not catch
            raise KeyError(f"weight sync: {len(missing)} parameter(s) not in the buckets, e.g. {missing[:3]}")

    @torch.no_grad()
    def sequence_logprob(self, prompt_ids: list[int], response_ids: list[int]) -> float:
        batch = collate_sequences([prompt_ids], [response_ids], self.tokenizer.pad_token_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        token_lp = token_logprobs(self.model, batch["input_ids"], batch["attention_mask"])
        return sequence_logprobs(token_lp, batch["response_mask"]).item()

    def reset_prefix_cache(self) -> None:
        """HF generate keeps no cache between calls."""


class VLLMEngine(RolloutEngine):
    """vLLM 0.33 (`pip install -e .[vllm]` on a GPU node), token-in/token-out through `TokensPrompt`.

    Weight sync has two paths:
    - GPU: vLLM's native weight-transfer API (`weight_transfer_config=WeightTransferConfig(backend="nccl")`);
      learner rank 0 broadcasts packed buckets over NCCL (`actors/weight_sync.py`), this engine receives them in
      `receive_weights` after `init_weight_transfer` joined the group.
    - object store: `update_weights` runs `model.load_weights` on every worker through `collective_rpc`
      (`WorkerExtension` below).
    With tensor_parallel_size > 1 the workers are Ray actors in the caller's placement group.
    """

    def __init__(self, model_path: str, model_cfg: ModelConfig, rollout_cfg: EngineConfig):
        try:
            from vllm import LLM
            from vllm.config import WeightTransferConfig
        except ImportError as e:
            raise RuntimeError(
                "rollout.engine is 'vllm' but vLLM is not installed; on a GPU node install the `vllm` extra "
                "(`pip install -e .[vllm]`), or use rollout.engine=hf"
            ) from e
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(
            model_cfg.tokenizer or model_path, trust_remote_code=model_cfg.trust_remote_code
        )
        self.tensor_parallel_size = rollout_cfg.tensor_parallel_size
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
            weight_transfer_config=WeightTransferConfig(backend="nccl"),
            worker_extension_cls="sami.rollout_engines.WorkerExtension",
        )
        self.max_prompt_tokens = model_cfg.max_prompt_tokens

    def generate(self, prompts: list[str], sampling: SamplingConfig, seed: int) -> list[Completion]:
        from vllm import SamplingParams, TokensPrompt

        # tokenised here exactly as HFEngine does (no special tokens, keep the end of a long prompt)
        token_prompts = [
            TokensPrompt(prompt_token_ids=self.tokenizer(p, add_special_tokens=False).input_ids[-self.max_prompt_tokens :])
            for p in prompts
        ]
        params = SamplingParams(
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=0, max_tokens=sampling.max_new_tokens,
            seed=seed,
        )
        outputs = self.llm.generate(token_prompts, params, use_tqdm=False)
        completions = []
        for output in outputs:
            out = output.outputs[0]
            ids = list(out.token_ids)
            if out.finish_reason == "stop" and out.stop_reason is None:
                ids = ids[:-1]  # stopped on EOS, which vLLM keeps and HFEngine never returns
            reason = "length" if out.finish_reason == "length" else "stop"
            completions.append(Completion(self.tokenizer.decode(ids, skip_special_tokens=True), ids, reason))
        return completions

    def update_weights(self, buckets: list[dict[str, np.ndarray]]) -> None:
        for bucket in buckets:
            self.llm.collective_rpc("load_numpy_bucket", args=(bucket,))
        self.reset_prefix_cache()

    def init_weight_transfer(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
        """Join the NCCL group of learner rank 0 (rank 0) and every engine's workers (see actors/weight_sync.py)."""
        self.llm.init_weight_transfer_engine({"init_info": {
            "master_address": master_address, "master_port": master_port,
            "rank_offset": rank_offset, "world_size": world_size,
        }})

    def receive_weights(self, names: list[str], dtype_names: list[str], shapes: list[list[int]]) -> None:
        """Blocks until learner rank 0 has broadcast every listed parameter (packed), then drops stale KV."""
        self.llm.start_weight_update()
        self.llm.update_weights({"update_info": {
            "names": names, "dtype_names": dtype_names, "shapes": shapes, "packed": True,
        }})
        self.llm.finish_weight_update()
        self.reset_prefix_cache()

    def sequence_logprob(self, prompt_ids: list[int], response_ids: list[int]) -> float:
        from vllm import SamplingParams, TokensPrompt

        # prompt_logprobs=0 returns the log-prob of each given token; the response's are the last ones
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        out = self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids + response_ids), params, use_tqdm=False)[0]
        scored = out.prompt_logprobs[len(prompt_ids) :]
        return float(np.mean([entry[token].logprob for entry, token in zip(scored, response_ids)]))

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()


def make_engine(model_path: str, engine_cfg: EngineConfig, model_cfg: ModelConfig) -> RolloutEngine:
    if engine_cfg.engine == "hf":
        return HFEngine(model_path, model_cfg)
    if engine_cfg.engine == "vllm":
        return VLLMEngine(model_path, model_cfg, engine_cfg)
    raise ValueError(f"engine must be 'hf' or 'vllm', got {engine_cfg.engine!r}")


class WorkerExtension:
    """Mixed into every vLLM worker (`worker_extension_cls="sami.rollout_engines.WorkerExtension"`), so the engine
    can call `LLM.collective_rpc("load_numpy_bucket", ...)` by name (vLLM refuses pickled callables by default)."""

    def load_numpy_bucket(self, bucket: dict[str, np.ndarray]) -> None:
        """The object-store path: load one bucket in place. `load_weights` takes checkpoint (HF) names and
        shards them for tensor parallelism itself."""
        model = self.model_runner.model
        device = next(model.parameters()).device
        model.load_weights(weights=[(name, torch.from_numpy(array).to(device)) for name, array in bucket.items()])
