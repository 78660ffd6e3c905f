"""One learner rank: the policy under DeepSpeed, the frozen reference, the loss step and the run directory.

No Ray here: the training job's loop (pipelines/loop.py) hands each rank its query groups and calls
`train`, `save`; weight sync lives in actors/weight_sync.py. `init: base` restores the base weights and a
fresh optimiser from memory, never from disk.
"""
from __future__ import annotations

import copy
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from sami.config import OptimConfig, TrainConfig
from sami.deepspeed_compat import forget_zero3_module_functions, skip_cpu_shm_comm_op, zero3_full_state_dict
from sami.groups import QueryGroup, padding_id
from sami.logprobs import sequence_logprobs
from sami.lora import BaseView, load_adapter_folder, with_adapter
from sami.objectives import run_needs_reference, scoring_for
from sami.precision import deepspeed_bf16, learner_dtype
from sami.run_dir import DEEPSPEED_PICKLED_CLASSES, CheckpointError, RunDir, verify_checkpoint, verify_model_folder
from sami.scoring import PolicyLoss, forward_tokens, score
from sami.stops import StopRun
from sami.throughput import matmul_parameters, measure_peak_flops, throughput_figures, training_flops


@dataclass(frozen=True)
class DeepSpeedSettings:
    """Everything DeepSpeed-shaped, derived once from the config and the world size."""

    config: dict  # the DeepSpeed config dict
    micro_groups: int  # query groups per forward pass on one rank
    accumulation: int  # micro-batches per optimiser step on one rank
    bf16: bool
    dtype: torch.dtype  # the learner's weights (policy and reference): sami/precision.py


def deepspeed_settings(cfg: TrainConfig, world_size: int, use_gpu: bool) -> DeepSpeedSettings:
    per_rank = cfg.optim.groups_per_step // world_size
    micro = min(cfg.optim.micro_batch_groups, per_rank)
    if per_rank % micro:
        raise ValueError(f"optim.micro_batch_groups ({micro}) must divide the groups per step per learner ({per_rank})")
    bf16 = deepspeed_bf16(cfg, use_gpu)
    config = {
        "train_batch_size": cfg.optim.groups_per_step,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": per_rank // micro,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # a client torch optimizer: no fused-Adam JIT build
        "steps_per_print": 10**9,
    }
    return DeepSpeedSettings(config, micro, per_rank // micro, bf16, getattr(torch, learner_dtype(cfg, use_gpu)))


def make_optimizer(params, o: OptimConfig) -> torch.optim.Optimizer:
    if o.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)


def single_rank_group() -> None:
    """A process group of one CPU learner rank outside Ray (gloo, world size 1): what tests and benchmarks build a
    `Learner` in (under Ray Train the loop joins Train's group instead)."""
    import socket

    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu")
    skip_cpu_shm_comm_op()
    deepspeed.init_distributed(dist_backend="gloo")


@contextmanager
def weights_only_loads(engine):
    """DeepSpeed 0.19.8 unpickles a checkpoint with `torch.load(weights_only=False)` (TorchCheckpointEngine.load) and
    `load_checkpoint` takes no loader of ours: while this is open, the engine's loads go through torch's weights-only
    unpickler, which builds tensors, plain containers and DeepSpeed's own DEEPSPEED_PICKLED_CLASSES and calls nothing
    else, whoever wrote the file."""
    import importlib
    import pickle

    allowed = [getattr(importlib.import_module(module), name)
               for module, _, name in (c.rpartition(".") for c in DEEPSPEED_PICKLED_CLASSES)]
    checkpoint_engine = engine.checkpoint_engine

    def load(path, map_location=None):
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:
                raise CheckpointError(f"{path}: not a checkpoint DeepSpeed wrote, refused by the weights-only "
                                      f"loader ({str(e).splitlines()[0]})") from None

    checkpoint_engine.load = load  # shadows the class's method on this instance only
    try:
        yield
    finally:
        del checkpoint_engine.load


@contextmanager
def full_parameters(module, zero_stage: int):
    """Under ZeRO-3 every rank must take part in gathering the partitioned parameters."""
    with gathered(list(module.parameters()), zero_stage):
        yield


@contextmanager
def gathered(params: list, zero_stage: int, modifier_rank: int | None = None):
    """`params` whole on every rank while open (under ZeRO-3 a collective every rank joins). With `modifier_rank`,
    what that rank writes into them is what every rank's partition holds once closed."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield
    else:
        yield


@torch.no_grad()
def load_parameters(module: torch.nn.Module, values: dict[str, torch.Tensor], zero_stage: int) -> None:
    """`values` (parameter name -> tensor) into those parameters of `module`. Under ZeRO-3 a partitioned parameter
    holds no data to copy into: each module's own parameters are gathered in turn, rank 0 writes them and every rank
    keeps its partition (one module whole at a time, never the model)."""
    unknown = sorted(values.keys() - {name for name, _ in module.named_parameters()})
    if unknown:
        raise KeyError(f"{len(unknown)} name(s) are no parameter of the model, e.g. {unknown[:3]}")
    writes = zero_stage < 3 or torch.distributed.get_rank() == 0
    for prefix, sub in module.named_modules():
        own = [(name, p) for name, p in sub.named_parameters(prefix=prefix, recurse=False) if name in values]
        if own:
            with gathered([p for _, p in own], zero_stage, modifier_rank=0):
                for name, p in own if writes else ():
                    p.data.copy_(values[name])


_control = (None, None)  # (a default process group, its gloo companion)


def control_group():
    """The process group for the learners' small CPU collectives (flags, figures, Python objects, barriers): the
    default group where its backend serves CPU tensors (gloo), else a gloo group of the same ranks beside it, made
    once. NCCL serves CUDA tensors only: a CPU tensor there raises "No backend type associated with device type
    cpu", and an object collective there goes through the GPU. Every rank must make its first call in step (it
    builds the group)."""
    global _control
    world = torch.distributed.group.WORLD
    if torch.device("cpu") in world._device_types:
        return None  # the default group
    if _control[0] is not world:  # first call, or a new default group (the old one's companion died with it)
        _control = (world, torch.distributed.new_group(backend="gloo"))
    return _control[1]


def sum_over_ranks(values: list[float]) -> list[float]:
    """`values` summed over every learner rank (as float64, on the CPU); `values` itself outside a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(values)
    total = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(total, group=control_group())
    return total.tolist()


def stop_together(problem: "StopRun | None") -> None:
    """Raise on every rank if any rank met a `StopRun` (the others would otherwise wait in a collective forever)."""
    if sum_over_ranks([problem is not None])[0]:
        raise problem or StopRun("stopped together with another learner rank")


class NonFiniteError(StopRun):
    """A loss or gradient norm that is not a finite number: the run stops before anything of it is synced or saved."""


def max_over_ranks(value: int) -> int:
    """The largest `value` of every learner rank; `value` itself outside a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    largest = torch.tensor([value], dtype=torch.int64)
    torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX, group=control_group())
    return int(largest.item())


def every_rank_finite(value: float) -> bool:
    """Whether `value` is finite on every rank (so all ranks stop together instead of one hanging in a collective)."""
    return sum_over_ranks([not math.isfinite(value)])[0] == 0


def non_finite_message(iteration: int, step: int, what: str, value: float, last: dict | None) -> str:
    figures = ", ".join(f"{k} {v:.4g}" for k, v in last.items()) if last else "none yet"
    return (f"iteration {iteration}, optimiser step {step}: the {what} is {value}; last finite figures: {figures}. "
            f"Nothing of iteration {iteration} was synced, saved or exported (lower optim.lr?)")


def summarise_steps(step_stats: list[dict], accumulation: int) -> dict:
    """Means over every micro-batch, and the loss of each optimiser step (the mean of its micro-batches)."""
    mean = {k: sum(s[k] for s in step_stats) / len(step_stats) for k in step_stats[0]}
    losses = [s["loss"] for s in step_stats]
    per_step = [sum(losses[i : i + accumulation]) / accumulation for i in range(0, len(losses), accumulation)]
    return {**mean, "loss_first_step": per_step[0], "loss_last_step": per_step[-1], "loss_per_step": per_step}


class GroupStream:
    """A rank's shard of query groups as it arrives (from the data plane), read as the list it will be once whole:
    `take(cursor, n)` is `[shard[(cursor + i) % len(shard)] for i in range(n)]`, waiting only for what it has not
    received yet; the length is known (and the cycling starts) once the source is exhausted. `prepare` readies each
    group as it arrives (tokenising it)."""

    def __init__(self, source: Iterable[QueryGroup], prepare: Callable[[QueryGroup], QueryGroup] = lambda g: g):
        self._source, self._prepare = iter(source), prepare
        self.received: list[QueryGroup] = []
        self.exhausted = False

    def _pull(self) -> bool:
        """One more group; False once the source is exhausted."""
        if not self.exhausted:
            group = next(self._source, None)
            if group is not None:
                self.received.append(self._prepare(group))
                return True
            self.exhausted = True
        return False

    def take(self, cursor: int, count: int) -> list[QueryGroup]:
        while len(self.received) < cursor + count and self._pull():
            pass
        if not self.received:
            raise StopRun("no query group reached this learner: fewer groups survived filtering than there are learners")
        if cursor + count <= len(self.received):
            return self.received[cursor : cursor + count]
        return [self.received[(cursor + i) % len(self.received)] for i in range(count)]

    def drain(self) -> list[QueryGroup]:
        """The whole shard (the rest of the stream is read, so its execution ends)."""
        while self._pull():
            pass
        return self.received


class Learner:
    """One rank's policy (a DeepSpeed engine), its frozen reference and its tokenizer."""

    def __init__(self, cfg: TrainConfig, model_path: str, world_size: int, device: torch.device, use_gpu: bool):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, self.world_size, self.device, self.use_gpu = cfg, world_size, device, use_gpu
        self.settings = deepspeed_settings(cfg, world_size, use_gpu)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or model_path,
                                                       trust_remote_code=cfg.model.trust_remote_code)
        self.pad_id = padding_id(self.tokenizer)
        load = dict(trust_remote_code=cfg.model.trust_remote_code, dtype=self.settings.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, **load)
        self.matmul_parameters = matmul_parameters(self.model)  # before ZeRO-3 partitions them
        # once per learner start: the denominator of the MFU figure
        self.peak_flops = measure_peak_flops(device, self.settings.dtype)
        self.lora = cfg.model.lora.enabled
        # The frozen base model: the KL / DPO reference, and the weights `init: base` restarts from. Under LoRA
        # it is the policy itself with the adapter switched off, and `init: base` restarts from the fresh adapter.
        self.base = None
        if self.lora:
            self.model = with_adapter(self.model, cfg.model.lora)
            self.base = BaseView(self.model)
        elif run_needs_reference(cfg) or cfg.schedule.init == "base":
            self.base = AutoModelForCausalLM.from_pretrained(model_path, **load).to(device).eval().requires_grad_(False)
        # what `init: base` restarts from: the fresh adapter under LoRA (the base weights are the reference's)
        self.fresh_adapter = {name: p.detach().clone() for name, p in self.model.named_parameters()
                              if p.requires_grad} if self.lora else None
        zero3_ranks = cfg.deepspeed.zero_stage == 3 and world_size > 1
        self.loss = PolicyLoss(self.model, self.base, cfg, self.pad_id, device, max_over_ranks if zero3_ranks else None)
        self.engine = None
        self.engine = self._deepspeed_engine()

    def _deepspeed_engine(self):
        """A DeepSpeed engine over the policy's loss module, with a fresh optimiser (a previous engine is destroyed
        first: its hooks would stay on the same parameters)."""
        import deepspeed

        if self.engine is not None:
            self.engine.destroy()
            forget_zero3_module_functions(self.loss)
        trained = [p for p in self.loss.parameters() if p.requires_grad]  # under LoRA the adapter's only
        engine, *_ = deepspeed.initialize(model=self.loss, optimizer=make_optimizer(trained, self.cfg.optim),
                                          config=self.settings.config)
        return engine

    @property
    def module(self):
        """The policy (the HF model, or its PEFT wrapper under LoRA) inside the DeepSpeed engine."""
        return self.engine.module.policy

    def _start_from_base(self) -> None:
        """`init: base`: the base weights (under LoRA the fresh adapter) back in the policy, and a fresh optimiser."""
        stage = self.cfg.deepspeed.zero_stage
        if self.lora:
            load_parameters(self.model, self.fresh_adapter, stage)
        else:
            load_parameters(self.model, dict(self.base.named_parameters()), stage)
        self.engine = self._deepspeed_engine()  # ZeRO keeps its own (master) copy of the weights: rebuild it

    def restore(self, run_dir: RunDir, iteration: int) -> str:
        """Continue after `iteration`: its DeepSpeed checkpoint (whole, loaded weights-only), else the weights of its
        HF export (whole; safetensors, nothing unpickled) with a fresh optimiser. Returns which ("deepspeed" / "hf")."""
        source = run_dir.resume_source(iteration)
        if source == "deepspeed":
            verify_checkpoint(run_dir.deepspeed(iteration))
            with weights_only_loads(self.engine):  # under LoRA the checkpoint holds the adapter only (`save`)
                self.engine.load_checkpoint(str(run_dir.deepspeed_root), tag=run_dir.tag(iteration),
                                            load_module_strict=not self.lora)
        elif source == "hf" and self.lora:
            verify_model_folder(run_dir.hf(iteration))
            adapter = [p for p in self.model.parameters() if p.requires_grad]
            with gathered(adapter, self.cfg.deepspeed.zero_stage, modifier_rank=0):  # the adapter only, never the base
                load_adapter_folder(self.model, run_dir.hf(iteration))
            self.engine = self._deepspeed_engine()
        elif source == "hf":
            from transformers import AutoModelForCausalLM

            verify_model_folder(run_dir.hf(iteration))
            saved = AutoModelForCausalLM.from_pretrained(run_dir.hf(iteration), use_safetensors=True,
                                                         trust_remote_code=self.cfg.model.trust_remote_code)
            load_parameters(self.model, dict(saved.named_parameters()), self.cfg.deepspeed.zero_stage)
            self.engine = self._deepspeed_engine()  # ZeRO keeps its own copy of the weights: rebuild it
        else:
            raise CheckpointError(f"{run_dir.path}: iteration {iteration} has neither a DeepSpeed checkpoint nor an HF export")
        return source

    def train(self, iteration: int, groups: list[QueryGroup] | GroupStream,
              on_step: Optional[Callable[[int, int], None]] = None) -> dict:
        """The iteration's optimiser steps on this rank's groups (cycled), a list or a `GroupStream` still arriving
        (each micro-batch waits only for its own groups); returns the step figures, with `first_micro_batch_at`
        (time.time() once the first micro-batch's groups were here) and `time_wait_groups` (seconds spent waiting for
        groups, which the learner's rates leave out). `on_step(step, steps)` is called after each
        optimiser step (the console's progress). Every rank stops together if one's stream failed."""
        cfg, s = self.cfg, self.settings
        scoring = scoring_for(cfg, iteration)
        if cfg.schedule.init == "base" and iteration > 1:
            self._start_from_base()
        started = time.perf_counter()
        self.engine.train()
        stream = groups if isinstance(groups, GroupStream) else GroupStream(groups)
        step_stats, cursor, real_tokens, padded_tokens, first_batch_at, waited = [], 0, 0, 0, None, 0.0
        for micro in range(cfg.steps_for_iteration(iteration) * s.accumulation):
            step = micro // s.accumulation + 1
            batch, problem, asked = [], None, time.perf_counter()
            try:
                batch = stream.take(cursor, s.micro_groups)
            except StopRun as e:
                problem = e
            stop_together(problem)
            waited += time.perf_counter() - asked
            first_batch_at = first_batch_at or time.time()
            cursor += s.micro_groups
            real, padded = forward_tokens(batch, scoring)
            real_tokens, padded_tokens = real_tokens + real, padded_tokens + padded
            loss, stats = self.engine(batch, scoring)  # DeepSpeed's forward: ZeRO-3 counts the micro-step there
            last = step_stats[-1] if step_stats else None
            if not every_rank_finite(loss.item()):  # before backward: no step is taken on it
                raise NonFiniteError(non_finite_message(iteration, step, "loss", loss.item(), last))
            self.engine.backward(loss)
            self.engine.step()
            norm = self.engine.get_global_grad_norm()  # set at each accumulation boundary
            if norm is not None and (micro + 1) % s.accumulation == 0 and not every_rank_finite(float(norm)):
                raise NonFiniteError(non_finite_message(iteration, step, "gradient norm", float(norm), last))
            step_stats.append(stats)
            if on_step is not None and (micro + 1) % s.accumulation == 0:
                on_step(step, cfg.steps_for_iteration(iteration))
        self.engine.eval()
        seconds = time.perf_counter() - started
        flops = training_flops(self.matmul_parameters, real_tokens, real_tokens if scoring.reference else 0)
        # the learner group's rates: every rank's tokens and peak
        real_tokens, padded_tokens, flops, peak = sum_over_ranks([real_tokens, padded_tokens, flops, self.peak_flops])
        # the rates over the time the rank trained: not the time it waited for groups still being generated
        return {**summarise_steps(step_stats, s.accumulation), "time_train": seconds, "time_wait_groups": waited,
                "first_micro_batch_at": first_batch_at,
                **throughput_figures(int(real_tokens), int(padded_tokens), flops, peak, seconds - waited)}

    @torch.no_grad()
    def probe_logprob(self, probe: tuple[list[int], list[int]]) -> float:
        """Mean log-prob per token of the probe response, as the rollout engines must score it after a sync."""
        with full_parameters(self.module, self.cfg.deepspeed.zero_stage):
            token_lp, mask = score(self.module, [probe[0]], [probe[1]], self.pad_id, True, self.device)
            return sequence_logprobs(token_lp.float(), mask).item()

    def save(self, run_dir: RunDir, iteration: int, rank: int) -> float:
        """DeepSpeed checkpoint and HF export of this iteration (every rank takes part); returns seconds. Under LoRA
        both hold the adapter only (the export in PEFT format: `PeftModel.from_pretrained` loads it on its base),
        and `model.lora.export_merged` adds the merged model."""
        started = time.perf_counter()
        if self.cfg.checkpoint.deepspeed:
            self.engine.save_checkpoint(str(run_dir.deepspeed_root), tag=run_dir.tag(iteration),
                                        exclude_frozen_parameters=self.lora)
        if self.cfg.checkpoint.export_hf:
            zero3 = self.cfg.deepspeed.zero_stage == 3
            state = zero3_full_state_dict(self.engine) if zero3 else None
            if state is not None:  # named from the loss module: the policy's own names
                state = {name.removeprefix("policy."): tensor for name, tensor in state.items()}
            if rank == 0:
                out = run_dir.hf(iteration)
                self.module.save_pretrained(out, state_dict=state)
                self.tokenizer.save_pretrained(out)
                if self.lora and self.cfg.model.lora.export_merged:  # the config refuses it under ZeRO-3
                    merged = copy.deepcopy(self.module).merge_and_unload()
                    merged.save_pretrained(run_dir.merged(iteration))
                    self.tokenizer.save_pretrained(run_dir.merged(iteration))
        return time.perf_counter() - started
