"""Rollout engines behind one interface: `hf` (transformers generate, CPU or GPU) and `vllm` (GPU).

The training loop only sees `RolloutEngine`: generate completions, take new weights in buckets, score a
probe sequence (to verify a sync), reset the prefix cache. vLLM is an optional extra; importing this
module never needs it.

Both engines return a completion's token ids *without* its stop token, that token apart (`end_id`: what the training
sequence ends with) and finish_reason "stop" when a stop token ended it, "length" otherwise. Prompts are tokenised
by `sami.groups.prompt_token_ids`, as the learner tokenises them.
"""
from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from sami.config import EngineConfig, ModelConfig, SamplingConfig
from sami.groups import QueryGroup, padding_id, prompt_token_ids
from sami.scoring import score_groups
from sami.logprobs import collate_sequences, sequence_logprobs, token_logprobs
from sami.lora import (adapter_base, adapter_rank, is_adapter_folder, sync_tensors, vllm_max_lora_rank, with_adapter,
                       write_adapter_folder)
from sami.objectives import Scoring, pair_sequences
from sami.precision import model_dtype


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # the new tokens, the stop token excluded
    finish_reason: str  # "stop" (a stop token sampled) or "length" (max_new_tokens reached)
    end_id: int  # the stop token sampled; where max_new_tokens cut the response, the tokenizer's EOS


Seeds = Union[int, Sequence[int]]


class RolloutEngine:
    dtype: torch.dtype  # the precision the engine computes in; the probe check's tolerance depends on it
    tokenizer: object  # the model's HF tokenizer (the evaluation renders chats and tokenises the MI bound's pairs)

    def generate(self, prompts: list[str], sampling: SamplingConfig, seeds: Seeds) -> list[Completion]:
        """One completion per prompt. `seeds`: one per prompt (a prompt's sample depends on its own seed only,
        not on what shares its batch), or one for the call, spread over the prompts by `request_seeds`."""
        raise NotImplementedError

    def update_weights(self, buckets: list[dict[str, np.ndarray]]) -> None:
        """The CPU / object-store path: load every parameter from numpy buckets, in place (under LoRA, every
        tensor of the adapter, by its PEFT name)."""
        raise NotImplementedError

    def sequence_logprob(self, prompt_ids: list[int], response_ids: list[int]) -> float:
        """Mean log-prob per response token given the prompt, as the learner computes it."""
        raise NotImplementedError

    def reset_prefix_cache(self) -> None:
        raise NotImplementedError

    def pair_logprobs(self, groups: list[QueryGroup], scoring: Scoring) -> torch.Tensor:
        """[groups, pairs]: mean log-prob per token of response j (EOS included) given prompt i, for each (i, j)
        in `scoring.pairs` of each tokenised group, as the learner scores them (the evaluation's MI bound). One pair at a
        time through `sequence_logprob`; an engine holding the model in this process batches them."""
        prompts, responses = pair_sequences(groups, scoring.pairs)
        scores = [self.sequence_logprob(p, r) for p, r in zip(prompts, responses)]
        return torch.tensor(scores, dtype=torch.float64).view(len(groups), len(scoring.pairs))


def _stop_ids(tokenizer, generation_config) -> set[int]:
    """EOS of the tokenizer plus any the model's generation config names (Llama 3 has several)."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(generation_config, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra])
    return {i for i in ids if i is not None}


class HFEngine(RolloutEngine):
    """transformers `generate`, batched with left padding; weights updated in place, never reloaded. An adapter
    folder (PEFT format) is served on its base; under `model.lora` the engine holds an adapter of its own, which
    each sync loads."""

    def __init__(self, model_path: str, model_cfg: ModelConfig, device: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(
            model_cfg.tokenizer or model_path, trust_remote_code=model_cfg.trust_remote_code
        )
        self.tokenizer.padding_side = "left"  # lines up every prompt's last token
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = getattr(torch, model_dtype(model_cfg.dtype, use_gpu=self.device.startswith("cuda")))
        adapter = model_path if is_adapter_folder(model_path) else None
        self.model = AutoModelForCausalLM.from_pretrained(
            adapter_base(adapter) if adapter else model_path, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code
        )
        if adapter:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, adapter)
        elif model_cfg.lora.enabled:
            self.model = with_adapter(self.model, model_cfg.lora)
        self.model = self.model.to(self.device).eval()
        self.max_prompt_tokens = model_cfg.max_prompt_tokens
        self.stop_ids = _stop_ids(self.tokenizer, self.model.generation_config)
        self.dtype = self.model.dtype

    def _generation_config(self, sampling: SamplingConfig):
        """Greedy decoding over the scores `SeededSampler` perturbs; the model's own generation defaults
        (top_k=50, temperature, ...) do not leak in."""
        from transformers import GenerationConfig

        return GenerationConfig(do_sample=False, temperature=None, top_p=None, top_k=None,
                                max_new_tokens=sampling.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                eos_token_id=sorted(self.stop_ids))

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: SamplingConfig, seeds: Seeds) -> list[Completion]:
        from transformers import LogitsProcessorList

        config, per_prompt = self._generation_config(sampling), prompt_seeds(seeds, len(prompts))
        completions = []
        for start in range(0, len(prompts), sampling.batch_size):
            ids = prompt_token_ids(self.tokenizer, prompts[start : start + sampling.batch_size], self.max_prompt_tokens)
            enc = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.device)
            sampler = [] if sampling.temperature == 0.0 else [
                SeededSampler(per_prompt[start : start + sampling.batch_size], sampling, self.device)]
            out = self.model.generate(**enc, generation_config=config, logits_processor=LogitsProcessorList(sampler))
            for row in out[:, enc.input_ids.shape[1] :].tolist():
                completions.append(self._completion(row))
        return completions

    def _completion(self, new_ids: list[int]) -> Completion:
        stop = next((i for i, tok in enumerate(new_ids) if tok in self.stop_ids), None)
        if stop is None:
            return Completion(self.tokenizer.decode(new_ids, skip_special_tokens=True), new_ids, "length",
                              self.tokenizer.eos_token_id)
        ids = new_ids[:stop]
        return Completion(self.tokenizer.decode(ids, skip_special_tokens=True), ids, "stop", new_ids[stop])

    @torch.no_grad()
    def update_weights(self, buckets: list[dict[str, np.ndarray]]) -> None:
        params = dict(sync_tensors(self.model))
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

    @torch.no_grad()
    def pair_logprobs(self, groups: list[QueryGroup], scoring: Scoring, batch_groups: int = 16) -> torch.Tensor:
        """The learner's own batched scoring (`score_groups`: the full C x C layout packed, each prompt once)."""
        rows = []
        for start in range(0, len(groups), batch_groups):
            chunk = groups[start : start + batch_groups]
            token_lp, mask, _ = score_groups(self.model, chunk, scoring, padding_id(self.tokenizer), True, self.device)
            rows.append(sequence_logprobs(token_lp, mask).view(len(chunk), len(scoring.pairs)))
        return torch.cat(rows)


def max_model_len(model_cfg: ModelConfig) -> int:
    """vLLM's context limit for this model config: the longest prompt, the longest response, the EOS the
    training sequences end with, and the one token vLLM insists on generating even when it only scores
    (it refuses a prompt of `max_model_len` tokens: vllm/v1/engine/input_processor.py `_validate_prompt_len`)."""
    return model_cfg.max_prompt_tokens + model_cfg.max_response_tokens + 2


def prompt_seeds(seeds: Seeds, n: int) -> list[int]:
    """One seed per prompt: `seeds` as given, or a call's seed spread by `request_seeds`."""
    if isinstance(seeds, int):
        return request_seeds(seeds, n)
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    return list(seeds)


class SeededSampler:
    """A transformers logits processor that makes greedy decoding draw a sample, each row from its own seed.

    transformers' `do_sample` draws a whole batch from one global generator, so a prompt's sample would depend
    on the other prompts in its batch. Here row r adds Gumbel noise from its own generator to its tempered,
    top-p-filtered log-probs; the argmax of that is an exact draw from the same distribution (the Gumbel-max
    trick), and it depends on the row's seed alone.
    """

    def __init__(self, seeds: list[int], sampling: SamplingConfig, device: str):
        self.generators = [torch.Generator(device).manual_seed(s) for s in seeds]
        self.temperature, self.top_p = sampling.temperature, sampling.top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:  # the smallest set of most likely tokens whose mass reaches top_p (at least one)
            sorted_logp, order = logp.sort(dim=-1, descending=True)
            mass_before = sorted_logp.exp().cumsum(dim=-1) - sorted_logp.exp()
            logp = logp.scatter(-1, order, sorted_logp.masked_fill(mass_before >= self.top_p, -torch.inf))
        uniform = torch.stack([torch.rand(logp.shape[-1], generator=g, device=logp.device) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(min=torch.finfo(torch.float32).tiny)))
        return logp + gumbel


def request_seeds(seed: int, n: int) -> list[int]:
    """One seed per request: vLLM seeds every request on its own, so one seed for a whole call would give
    identical samples for identical prompts. Drawn from a generator seeded with `seed` (not `seed + i`), so a
    call is reproducible and calls with neighbouring seeds do not hand the same seed to other prompts."""
    return np.random.default_rng(seed).integers(0, 2**31 - 1, size=n).tolist()


class VLLMEngine(RolloutEngine):
    """vLLM 0.33 (`pip install -e .[vllm]` on a GPU node), token-in/token-out through `TokensPrompt`.

    Weight sync has two paths (both through vLLM's layerwise reload, `start_weight_update` /
    `finish_weight_update`, which restores the checkpoint-shaped parameters before loading and re-runs
    the kernels' weight processing after it):
    - GPU: vLLM's native weight-transfer API (`weight_transfer_config=WeightTransferConfig(backend="nccl")`);
      learner rank 0 broadcasts packed buffers over NCCL (`actors/weight_sync.py`); this engine first checks
      and accepts the update (`prepare_weight_update`), then receives it (`receive_weights`).
    - object store: `update_weights` sends each bucket to every worker through `collective_rpc`
      (`WorkerExtension.load_bucket`) as raw bytes with dtype and shape, since collective_rpc arguments are
      msgpack-encoded without numpy types.
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
        from transformers import AutoTokenizer, GenerationConfig

        self.tokenizer = AutoTokenizer.from_pretrained(
            model_cfg.tokenizer or model_path, trust_remote_code=model_cfg.trust_remote_code
        )
        # LoRA: an adapter folder is served on its base under one `LoRARequest`; under `model.lora` each sync adds
        # the learner's adapter under a new id (`_swap_adapter`). None: the base alone (before the first sync).
        served = model_path if is_adapter_folder(model_path) else None
        base = adapter_base(served) if served else model_path
        rank = adapter_rank(served) if served else model_cfg.lora.rank if model_cfg.lora.enabled else None
        self.lora_settings, self.base_model = model_cfg.lora, base
        self.lora_request = self._lora_request(1, served) if served else None
        self.adapter_dir = tempfile.mkdtemp(prefix="sami-adapters-") if model_cfg.lora.enabled else None
        lora = {"enable_lora": True, "max_lora_rank": vllm_max_lora_rank(rank), "max_loras": 1} if rank else {}
        try:
            generation_config = GenerationConfig.from_pretrained(base)
        except OSError:  # a checkpoint without generation_config.json
            generation_config = None
        self.stop_ids = _stop_ids(self.tokenizer, generation_config)
        dtype = model_dtype(model_cfg.dtype, use_gpu=True)  # vLLM runs on GPUs (its CPU build only in tests)
        self.dtype = getattr(torch, dtype)
        self.tensor_parallel_size = rollout_cfg.tensor_parallel_size
        self.llm = LLM(
            model=base,
            tokenizer=model_cfg.tokenizer or model_path,
            dtype=dtype,
            tensor_parallel_size=rollout_cfg.tensor_parallel_size,
            distributed_executor_backend="ray" if rollout_cfg.tensor_parallel_size > 1 else None,
            gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
            enable_prefix_caching=rollout_cfg.enable_prefix_caching,
            enforce_eager=rollout_cfg.enforce_eager,
            trust_remote_code=model_cfg.trust_remote_code,
            max_model_len=max_model_len(model_cfg),
            weight_transfer_config=WeightTransferConfig(backend="nccl"),
            worker_extension_cls="sami.rollout_engines.WorkerExtension",
            **lora,
        )
        self.max_prompt_tokens = model_cfg.max_prompt_tokens
        self.transfer_joined = False
        self.pending_update: dict | None = None

    def generate(self, prompts: list[str], sampling: SamplingConfig, seeds: Seeds) -> list[Completion]:
        from vllm import SamplingParams, TokensPrompt

        # tokenised exactly as HFEngine and the learner do
        token_prompts = [TokensPrompt(prompt_token_ids=ids)
                         for ids in prompt_token_ids(self.tokenizer, prompts, self.max_prompt_tokens)]
        # the stop set HFEngine uses (tokenizer EOS + the generation config's), whatever vLLM reads itself
        params = [
            SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                           max_tokens=sampling.max_new_tokens, seed=s, stop_token_ids=sorted(self.stop_ids))
            for s in prompt_seeds(seeds, len(prompts))
        ]
        outputs = self.llm.generate(token_prompts, params, use_tqdm=False, lora_request=self.lora_request)
        return [self._completion(list(output.outputs[0].token_ids), output.outputs[0].finish_reason) for output in outputs]

    def _completion(self, ids: list[int], finish_reason: str) -> Completion:
        """vLLM keeps the stop token in `token_ids` (a tokenizer EOS with stop_reason None, a generation-config
        EOS with stop_reason=<id>): it becomes `end_id`, as HFEngine returns it."""
        end_id = self.tokenizer.eos_token_id
        if finish_reason == "stop" and ids and ids[-1] in self.stop_ids:
            ids, end_id = ids[:-1], ids[-1]
        reason = "length" if finish_reason == "length" else "stop"
        return Completion(self.tokenizer.decode(ids, skip_special_tokens=True), ids, reason, end_id)

    @staticmethod
    def _lora_request(lora_id: int, folder: str):
        from vllm.lora.request import LoRARequest

        return LoRARequest(f"sami-adapter-{lora_id}", lora_id, str(folder))

    def _swap_adapter(self, tensors: dict[str, np.ndarray]) -> None:
        """The learner's adapter, written in PEFT format to a folder of this engine's (vLLM loads adapters from a
        folder only), added under a new id that every later request uses; the old one is removed. Not through
        `start/finish_weight_update`: `finish_weight_update` clears every loaded adapter."""
        new_id = self.lora_request.lora_int_id + 1 if self.lora_request else 1
        folder = write_adapter_folder(Path(self.adapter_dir) / f"adapter-{new_id}", tensors, self.lora_settings,
                                      self.base_model)
        request = self._lora_request(new_id, folder)
        if not self.llm.llm_engine.add_lora(request):  # loads it now: a bad adapter fails here, not in a request
            raise RuntimeError(f"weight sync: vLLM did not load the adapter in {folder}")
        old, self.lora_request = self.lora_request, request
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            if Path(old.lora_path).parent == Path(self.adapter_dir):  # one this engine wrote, never a served export
                shutil.rmtree(old.lora_path, ignore_errors=True)

    def update_weights(self, buckets: list[dict[str, np.ndarray]]) -> None:
        if self.adapter_dir is not None:
            self._swap_adapter({name: array for bucket in buckets for name, array in bucket.items()})
            self.reset_prefix_cache()
            return
        self.llm.start_weight_update()
        try:
            for bucket in buckets:
                self.llm.collective_rpc("load_bucket", args=(encode_bucket(bucket),))
        finally:  # close the layerwise reload even on an error, or the engine refuses every later update
            self.llm.finish_weight_update()
        self.reset_prefix_cache()

    def init_weight_transfer(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                             wire: dict) -> None:
        """Join the NCCL group of learner rank 0 (rank 0) and every engine's workers (see actors/weight_sync.py).
        `wire` (packed, buffer size, buffer count) must be what the learner's producer uses: vLLM's
        receivers decode by it (`NCCLWeightTransferInitInfo`, nccl_common.py)."""
        self.llm.init_weight_transfer_engine({"init_info": {
            "master_address": master_address, "master_port": master_port,
            "rank_offset": rank_offset, "world_size": world_size, **wire,
        }})
        self.transfer_joined = True

    def prepare_weight_update(self, names: list[str], dtype_names: list[str], shapes: list[list[int]]) -> None:
        """Check an update before anything is broadcast and open it: an error here is an error, while the same
        error inside `receive_weights` would leave the learner blocked in NCCL forever."""
        from dataclasses import asdict

        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo

        if not self.transfer_joined:
            raise RuntimeError("weight sync: this engine has not joined the NCCL group (init_weight_transfer)")
        unknown = sorted({d for d in dtype_names if not isinstance(getattr(torch, d, None), torch.dtype)})
        if unknown:
            raise ValueError(f"weight sync: unknown dtype name(s) {unknown}")
        # vLLM's own parsing of the update info (what its workers will do with it)
        info = asdict(NCCLWeightTransferUpdateInfo(names=names, dtype_names=dtype_names, shapes=shapes))
        self.llm.start_weight_update()
        self.pending_update = info

    def receive_weights(self) -> None:
        """Blocks until learner rank 0 has broadcast every parameter of the prepared update, then drops stale KV."""
        if self.pending_update is None:
            raise RuntimeError("weight sync: receive_weights without prepare_weight_update")
        info, self.pending_update = self.pending_update, None
        self.llm.update_weights({"update_info": info})
        self.llm.finish_weight_update()
        self.reset_prefix_cache()

    def sequence_logprob(self, prompt_ids: list[int], response_ids: list[int]) -> float:
        from vllm import SamplingParams, TokensPrompt

        # prompt_logprobs=0 returns the log-prob of each given token; the response's are the last ones
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        out = self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids + response_ids), params, use_tqdm=False,
                                lora_request=self.lora_request)[0]
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


def encode_bucket(bucket: dict[str, np.ndarray]) -> list[tuple[str, str, list[int], bytes]]:
    """A bucket as msgpack-safe values: `collective_rpc` arguments lose numpy types (arrays arrive as lists)."""
    return [(name, str(a.dtype), list(a.shape), np.ascontiguousarray(a).tobytes()) for name, a in bucket.items()]


def decode_bucket(encoded: list) -> list[tuple[str, torch.Tensor]]:
    """The inverse of `encode_bucket`, as (name, tensor) pairs for `load_weights`."""
    return [(name, torch.from_numpy(np.frombuffer(data, dtype=dtype).reshape(shape).copy()))
            for name, dtype, shape, data in encoded]


class WorkerExtension:
    """Mixed into every vLLM worker (`worker_extension_cls="sami.rollout_engines.WorkerExtension"`), so the engine
    can call `LLM.collective_rpc("load_bucket", ...)` by name (vLLM refuses pickled callables by default)."""

    def load_bucket(self, encoded: list) -> None:
        """The object-store path: load one encoded bucket, inside a `start/finish_weight_update` layerwise
        reload. `load_weights` takes checkpoint (HF) names and shards them for tensor parallelism itself."""
        model = self.model_runner.model
        model.load_weights(weights=[(name, tensor.to(self.device)) for name, tensor in decode_bucket(encoded)])
