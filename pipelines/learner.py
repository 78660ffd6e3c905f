"""The learner group: one long-lived Ray Train `fit()` whose workers run DeepSpeed and the whole online loop.

Ray Train's `fit()` is one SPMD run with no driver-to-worker calls, so the loop lives here: rank 0
coordinates the rollout actors and the principle writer, builds each iteration's query groups with Ray
Data, and hands every rank its shard; all ranks train; rank 0 syncs weights to the rollout engines and
verifies the sync; all ranks checkpoint. The model is loaded once; `init: base` restores the base weights
and a fresh optimiser from memory.
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from pipelines.config import TrainConfig
from pipelines.logprobs import collate_sequences, sequence_logprobs, token_logprobs
from pipelines.objectives import dpo_loss, kl_to_reference, sami_loss, sft_loss


def log(message: str) -> None:
    # Not print(): Ray Train patches print in its workers to both log and echo, so every line showed twice.
    sys.stdout.write(f"[sami {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stdout.flush()


def objective_for(cfg: TrainConfig, iteration: int) -> str:
    if cfg.objective.name == "sft_then_sami":
        return "sft" if iteration <= cfg.objective.sft_iterations else "sami"
    return cfg.objective.name


def deepspeed_config(cfg: TrainConfig, world_size: int, use_gpu: bool) -> dict:
    per_rank = cfg.optim.groups_per_step // world_size
    micro = min(cfg.optim.micro_batch_groups, per_rank)
    if per_rank % micro:
        raise ValueError(f"optim.micro_batch_groups ({micro}) must divide the groups per step per learner ({per_rank})")
    bf16 = use_gpu if cfg.deepspeed.bf16 == "auto" else bool(cfg.deepspeed.bf16)
    return {
        "train_batch_size": cfg.optim.groups_per_step,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": per_rank // micro,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # a client torch optimizer: no fused-Adam JIT build
        "steps_per_print": 10**9,
    }


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)


def skip_cpu_shm_comm_op() -> None:
    """On CPU DeepSpeed JIT-builds a shared-memory all-reduce op (~50 s, 1.5 GB); gloo does the job."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(model, cfg: TrainConfig, world_size: int, use_gpu: bool):
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=model, optimizer=make_optimizer(model.parameters(), cfg), config=deepspeed_config(cfg, world_size, use_gpu)
    )
    return engine


# ---------------------------------------------------------------------------------------------------------
# Objectives on a micro-batch of query groups


def _score(module, prompts, responses, pad_id, cfg, device):
    batch = {k: v.to(device) for k, v in collate_sequences(prompts, responses, pad_id, cfg.objective.sami.include_eos).items()}
    return token_logprobs(module, batch["input_ids"], batch["attention_mask"]), batch["response_mask"]


def micro_batch_loss(module, reference, rows: list[dict], cfg: TrainConfig, objective: str, pad_id: int, device):
    """(loss, stats) for `rows` (query groups) under `objective`: sami, sft or dpo."""
    c = cfg.principles.num_constitutions
    if objective == "sami":
        prompts = [r["prompt_ids"][i] for r in rows for i in range(c) for _ in range(c)]
        responses = [r["response_ids"][j] for r in rows for _ in range(c) for j in range(c)]
    elif objective == "sft":
        prompts, responses = [r["prompt_ids"][0] for r in rows], [r["response_ids"][0] for r in rows]
    else:  # dpo: the response under the positive constitution is chosen over each contrast's response
        prompts = [r["prompt_ids"][0] for r in rows for _ in range(c)]
        responses = [r["response_ids"][j] for r in rows for j in range(c)]
    token_lp, mask = _score(module, prompts, responses, pad_id, cfg, device)
    ref_lp = None
    if reference is not None:
        with torch.no_grad():
            ref_lp, _ = _score(reference, prompts, responses, pad_id, cfg, device)
    stats = {}
    if objective == "sami":
        seq = sequence_logprobs(token_lp, mask, cfg.objective.sami.reduction).view(len(rows), c, c)
        out = sami_loss(seq, cfg.objective.sami.direction)
        loss = out.loss
        stats.update(mi_lower_bound=out.mi_lower_bound.item(), row_accuracy=out.row_accuracy.item(),
                     col_accuracy=out.col_accuracy.item())
        if cfg.objective.sft_weight > 0:  # SFT on the diagonal's positive pair (constitution 0, response 0)
            positive = torch.zeros_like(mask)
            positive[:: c * c] = mask[:: c * c]
            loss = loss + cfg.objective.sft_weight * sft_loss(token_lp, positive)
        if cfg.objective.kl_beta > 0:
            kl = kl_to_reference(token_lp, ref_lp, mask)
            loss = loss + cfg.objective.kl_beta * kl
            stats["kl"] = kl.item()
    elif objective == "sft":
        loss = sft_loss(token_lp, mask)
    else:
        seq = sequence_logprobs(token_lp, mask, "sum").view(len(rows), c)
        ref = sequence_logprobs(ref_lp, mask, "sum").view(len(rows), c)
        chosen, rejected = seq[:, :1].expand(-1, c - 1), seq[:, 1:]
        loss, dpo_stats = dpo_loss(chosen.reshape(-1), rejected.reshape(-1), ref[:, :1].expand(-1, c - 1).reshape(-1),
                                   ref[:, 1:].reshape(-1), cfg.objective.dpo.beta, cfg.objective.dpo.loss_type)
        stats.update({k: v.item() for k, v in dpo_stats.items()})
    stats["loss"] = loss.item()
    return loss, stats


# ---------------------------------------------------------------------------------------------------------
# Weight sync and checkpoints


@contextmanager
def full_parameters(module, zero_stage: int):
    """Under ZeRO-3 every rank must take part in gathering the partitioned parameters."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield
    else:
        yield


def open_nccl_sync(actors, cfg: TrainConfig):
    """GPU: one NCCL group spanning learner rank 0 and every vLLM worker (actors/vllm_sync.py)."""
    import socket

    import ray

    from actors.vllm_sync import trainer_group

    with socket.socket() as sock:  # a free port on this node for the group's rendezvous
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    address, tp = ray.util.get_node_ip_address(), cfg.rollout.tensor_parallel_size
    world_size = 1 + len(actors) * tp
    refs = [a.init_weight_transfer.remote(address, port, 1 + e * tp, world_size) for e, a in enumerate(actors)]
    group = trainer_group(address, port, world_size)  # joins while the engines join
    ray.get(refs)
    return group


def sync_weights(module, actors, cfg: TrainConfig, rank: int, nccl_group=None) -> dict:
    """Learner -> every rollout engine, one control call per engine: on CPU one object-store put of all
    buckets; on GPU (vLLM) an NCCL broadcast of packed buffers from rank 0."""
    import ray

    from actors.rollout_engines import state_dict_buckets

    with full_parameters(module, cfg.deepspeed.zero_stage):
        if rank != 0:
            return {}
        named = list(module.named_parameters())
        nbytes = sum(t.numel() * t.element_size() for _, t in named)
        if nccl_group is not None:
            from actors.vllm_sync import broadcast_weights, weight_metadata

            refs = [actor.receive_weights.remote(*weight_metadata(named)) for actor in actors]
            broadcast_weights(nccl_group, named)
            ray.get(refs)
            return {"sync_bytes": nbytes, "buckets": 1}
        buckets = state_dict_buckets(named, cfg.rollout.sync_bucket_mb)
    ref = ray.put(buckets)
    results = ray.get([actor.update_weights.remote(ref) for actor in actors])
    return {"sync_bytes": results[0]["bytes"], "buckets": len(buckets)}


def probe_logprob(module, probe: tuple[list[int], list[int]], pad_id: int, zero_stage: int, device) -> float:
    with torch.no_grad(), full_parameters(module, zero_stage):
        batch = {k: v.to(device) for k, v in collate_sequences([probe[0]], [probe[1]], pad_id).items()}
        return sequence_logprobs(token_logprobs(module, batch["input_ids"], batch["attention_mask"]).float(),
                                 batch["response_mask"]).item()


def verify_sync(module, actors, probe, pad_id, cfg: TrainConfig, rank: int, device) -> float:
    """The rollout engines must score a probe sequence as the learner does, else the sync failed."""
    import ray

    learner = probe_logprob(module, probe, pad_id, cfg.deepspeed.zero_stage, device)
    if rank != 0:
        return 0.0
    engines = ray.get([a.sequence_logprob.remote(probe[0], probe[1]) for a in actors])
    diff = max(abs(e - learner) for e in engines)
    if diff > cfg.rollout.probe_tolerance:
        raise RuntimeError(f"weight sync verification failed: rollout engines score the probe {engines}, the learner "
                           f"{learner:.6f} (tolerance {cfg.rollout.probe_tolerance})")
    return diff


def export_hf(engine, tokenizer, out_dir: Path, zero_stage: int, rank: int) -> None:
    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if rank == 0:
        engine.module.save_pretrained(out_dir, state_dict=state)
        tokenizer.save_pretrained(out_dir)


def last_complete_iteration(run_dir: Path) -> int:
    done = [int(p.parent.name.split("-")[1]) for p in run_dir.glob("iteration-*/COMPLETE")]
    return max(done, default=0)


# ---------------------------------------------------------------------------------------------------------
# The loop


def broadcast(obj, rank: int):
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg: TrainConfig = config["cfg"]
    actors, writer = config["actors"], config["writer"]
    model_path, run_dir, train_rows = config["model_path"], Path(config["run_dir"]), config["train_queries"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = torch.cuda.is_available() and cfg.scaling.gpus_per_learner > 0
    device = torch.device("cuda", ctx.get_local_rank()) if use_gpu else torch.device("cpu")
    if not use_gpu:
        skip_cpu_shm_comm_op()
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    torch.manual_seed(cfg.run.seed + rank)
    from cluster.metrics import RunMetrics

    metrics = RunMetrics("train", cfg.run.name) if rank == 0 else None

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or model_path, trust_remote_code=cfg.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    load = dict(trust_remote_code=cfg.model.trust_remote_code, dtype=torch.float32 if not use_gpu else torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_path, **load)
    needs_reference = cfg.objective.kl_beta > 0 or cfg.objective.name == "dpo"
    needs_base = needs_reference or cfg.schedule.init == "base"
    # The frozen base model: the KL/DPO reference, and the weights `init: base` restarts from.
    base = AutoModelForCausalLM.from_pretrained(model_path, **load).to(device).eval().requires_grad_(False) if needs_base else None
    engine = build_engine(model, cfg, world, use_gpu)

    nccl_group = open_nccl_sync(actors, cfg) if rank == 0 and use_gpu and cfg.rollout.engine == "vllm" else None
    start = last_complete_iteration(run_dir) + 1 if config["resume"] else 1
    if start > 1:
        engine.load_checkpoint(str(run_dir / "deepspeed"), tag=f"iteration-{start - 1}")
        probe = tuple(json.loads((run_dir / f"iteration-{start - 1}" / "probe.json").read_text()))
        if rank == 0:
            log(f"resumed from iteration {start - 1}; re-syncing the rollout engines")
        sync_weights(engine.module, actors, cfg, rank, nccl_group)
        verify_sync(engine.module, actors, probe, pad_id, cfg, rank, device)

    micro = deepspeed_config(cfg, world, use_gpu)["train_micro_batch_size_per_gpu"]
    accumulation = cfg.optim.groups_per_step // world // micro
    for iteration in range(start, cfg.run.iterations + 1):
        objective = objective_for(cfg, iteration)
        steps = cfg.steps_for_iteration(iteration)
        record = {"iteration": iteration, "objective": objective}
        it_dir = run_dir / f"iteration-{iteration}"

        # --- principles and rollouts (rank 0 drives Ray Data; other ranks wait at the broadcast) ---
        shard_rows, probe = None, None
        if rank == 0:
            phase(metrics, "write_principles")
            t = time.perf_counter()
            ray.get(writer.prepare.remote())
            record["time_write_principles"] = time.perf_counter() - t
            log(f"iteration {iteration}/{cfg.run.iterations} [{objective}]: generating")
            phase(metrics, "generate")
            t = time.perf_counter()
            from pipelines.data import iteration_queries
            from pipelines.groups import build_iteration_dataset, replay_iteration_dataset

            queries = iteration_queries(train_rows, iteration, cfg.data.queries_per_iteration or steps * cfg.optim.groups_per_step,
                                        cfg.schedule.alternate_splits)
            if cfg.data.replay_groups_from:
                kept, counts = replay_iteration_dataset(Path(cfg.data.replay_groups_from), iteration)
            else:
                kept, counts = build_iteration_dataset(queries, writer, actors, cfg, iteration, config["tokenizer_path"])
            it_dir.mkdir(parents=True, exist_ok=True)
            frame = kept.to_pandas()
            frame.to_parquet(it_dir / "groups.parquet")
            record["time_generate"] = time.perf_counter() - t
            record.update(counts, groups=len(frame))
            if len(frame) < world:
                raise RuntimeError(f"iteration {iteration}: only {len(frame)} query groups survived filtering "
                                   f"({counts}); need at least one per learner")
            record["response_tokens"] = float(frame["response_tokens"].mean())
            record["truncated"] = int(frame["truncated"].sum())
            record["tokens_per_second"] = float(frame["response_tokens"].sum() * cfg.principles.num_constitutions / record["time_generate"])
            # Equal shards from the materialised frame (as Dataset.split(equal=True) would cut them, without
            # another Ray Data execution per shard: seconds each on a busy 2-core machine).
            records, per_rank = frame.to_dict("records"), len(frame) // world
            shards = [records[r * per_rank:(r + 1) * per_rank] for r in range(world)]
            probe = (list(map(int, frame["prompt_ids"][0][0])), list(map(int, frame["response_ids"][0][0])))
            log(f"iteration {iteration}: {len(frame)} groups kept of {len(queries)} ({counts}), "
                f"{record['time_generate']:.1f}s")
        shards, probe = broadcast((shards if rank == 0 else None, probe), rank)
        rows = [_plain(r) for r in shards[rank]]

        # --- train ---
        if rank == 0:
            phase(metrics, "train")
        if cfg.schedule.init == "base" and iteration > 1:
            model.load_state_dict(base.state_dict())
            engine = build_engine(model, cfg, world, use_gpu)  # fresh optimiser state, weights from memory
        t = time.perf_counter()
        engine.train()
        step_stats, cursor = [], 0
        for step in range(steps):
            for _ in range(accumulation):
                batch = [rows[(cursor + i) % len(rows)] for i in range(micro)]
                cursor += micro
                loss, stats = micro_batch_loss(engine.module, base if needs_reference else None, batch, cfg, objective, pad_id, device)
                engine.backward(loss)
                engine.step()
                step_stats.append(stats)
        record["time_train"] = time.perf_counter() - t
        mean = {k: sum(s[k] for s in step_stats) / len(step_stats) for k in step_stats[0]}
        per_step = [sum(s["loss"] for s in step_stats[i * accumulation:(i + 1) * accumulation]) / accumulation for i in range(steps)]
        record.update(mean, loss_first_step=per_step[0], loss_last_step=per_step[-1], loss_per_step=per_step)
        record.setdefault("mi_lower_bound", None)

        # --- sync + verify ---
        if rank == 0:
            phase(metrics, "sync")
        engine.eval()
        t = time.perf_counter()
        record.update(sync_weights(engine.module, actors, cfg, rank, nccl_group))
        record["probe_abs_diff"] = verify_sync(engine.module, actors, probe, pad_id, cfg, rank, device)
        record["time_sync"] = time.perf_counter() - t

        # --- checkpoint ---
        if rank == 0:
            phase(metrics, "checkpoint")
        t = time.perf_counter()
        if cfg.checkpoint.deepspeed:
            engine.save_checkpoint(str(run_dir / "deepspeed"), tag=f"iteration-{iteration}")
        if cfg.checkpoint.export_hf:
            export_hf(engine, tokenizer, it_dir / "hf", cfg.deepspeed.zero_stage, rank)
        record["time_checkpoint"] = time.perf_counter() - t
        dist.barrier()
        if rank == 0:
            (it_dir / "probe.json").write_text(json.dumps(list(probe)))
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            (it_dir / "COMPLETE").write_text("ok\n")
            if metrics is not None:
                metrics.record(iteration, record)
            mi = record["mi_lower_bound"]
            log(f"iteration {iteration} done: loss {record['loss_first_step']:.4f} -> {record['loss_last_step']:.4f}"
                + (f", MI bound {mi:.3f}" if mi is not None else "")
                + f", sync {record['time_sync']:.2f}s ({record.get('sync_bytes', 0) / 2**20:.1f} MiB), "
                f"train {record['time_train']:.1f}s, checkpoint {record['time_checkpoint']:.1f}s")
        ray.train.report({k: v for k, v in record.items() if isinstance(v, (int, float))})
    if rank == 0:
        phase(metrics, "idle")


def _plain(row: dict) -> dict:
    """Arrow hands back numpy arrays of arrays; the objectives want lists of ints."""
    return {**row, "prompt_ids": [list(map(int, x)) for x in row["prompt_ids"]],
            "response_ids": [list(map(int, x)) for x in row["response_ids"]]}


def phase(metrics, name: str) -> None:
    if metrics is not None:
        metrics.set_phase(name)
