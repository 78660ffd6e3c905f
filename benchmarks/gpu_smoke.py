"""GPU smoke benchmark: 2 SAMI iterations (vLLM engine, DeepSpeed bf16 learner, weight sync) on a ~0.5B model.

Through the real training job, with one vLLM engine and one DeepSpeed bf16 learner, on a real-architecture
model built here (nothing is downloaded).

    python -m benchmarks.gpu_smoke [--out runs/gpu-smoke] [key.path=value ...]

The model has Qwen2.5-0.5B's shape (Qwen2, hidden 896, 24 layers, 14 heads, 2 KV heads) with random bf16
weights and the built-in world's word-level tokenizer; data and principles are the built-in world's. It runs
`pipelines.train.run`, so generation, the weight sync with its probe check, training and checkpoints are the
code users run:
- 2 or more GPUs: the learner on one, the engine on another, weight sync over NCCL (vLLM's weight-transfer API);
- 1 GPU: both share it, weight sync through the object store (NCCL refuses two ranks on one device).
Prints and writes to <out>/gpu_smoke.json: sync seconds and bytes, generation tokens/s, learner tokens/s and an
MFU estimate (6 x parameters x learner tokens/s over the GPU's dense bf16 peak). Needs CUDA and the `vllm`
extra; everything GPU-only is imported inside `main`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from sami.run_dir import RunDir

# Dense bf16 peak FLOP/s by device name (the H100/H200 SXM figure); anything else falls back to the H100's.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)


def build_model(out: Path) -> tuple[Path, int]:
    """A Qwen2 model of Qwen2.5-0.5B's shape with random bf16 weights and the world's tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sami.tiny_model import train_tokenizer
    from sami.world.base_model import vocabulary_texts

    tokenizer = train_tokenizer(vocabulary_texts(), vocab_size=5000)
    config = Qwen2Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **QWEN2_05B)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def smoke_config(model_dir: Path, out: Path, gpus: int, overrides: list[str]):
    from sami.config import load_config

    shared = gpus == 1
    return load_config(None, [
        f"run.output_dir={out / 'run'}", "run.name=gpu-smoke", "run.iterations=2",
        f"model.name_or_path={model_dir}", "model.dtype=bfloat16", "model.max_prompt_tokens=256",
        "model.max_response_tokens=64",
        "data.source=world", "data.task=world", "data.max_queries=1024", "data.heldout_queries=0",
        "principles.source=world", "principles.mode=sample_k", "principles.principles_per_constitution=3",
        "sampling.temperature=1.0", "sampling.max_new_tokens=64", "sampling.batch_size=256",
        "rollout.engine=vllm", "rollout.num_engines=1", f"rollout.gpu_memory_utilization={0.35 if shared else 0.8}",
        f"rollout.weight_sync={'object_store' if shared else 'auto'}",
        "objective.name=sami", "optim.lr=1.0e-6", "optim.groups_per_step=64", "optim.micro_batch_groups=16",
        "schedule.init=previous", "schedule.steps_per_iteration=4",
        "deepspeed.zero_stage=2", "deepspeed.bf16=true", "checkpoint.deepspeed=false",
        "scaling.num_learners=1", "scaling.gpus_per_learner=1", "scaling.cpus_per_learner=1",
        *overrides,
    ])


def iteration_figures(run_dir: Path, row: dict, params: int, peak: float) -> dict:
    """One iteration's figures from its metrics row and its query groups."""
    import pyarrow.parquet as pq

    groups = pq.read_table(RunDir(run_dir).groups(row["iteration"])).to_pylist()
    generated = sum(g["response_tokens"] * len(g["responses"]) for g in groups)
    kept = [g for g in groups if not g["reject_reason"]]
    # SAMI scores every (constitution i, response j) pair: C x C sequences per kept group, each trained once
    trained = sum(len(p) + len(r) for g in kept for p in g["prompt_ids"] for r in g["response_ids"])
    learner_tps = trained / row["time_train"]
    return {
        "iteration": row["iteration"],
        "sync_seconds": row["time_sync"], "sync_bytes": row.get("sync_bytes"), "probe_abs_diff": row["probe_abs_diff"],
        "generation_tokens_per_s": generated / row["time_generate"], "generated_tokens": generated,
        "learner_tokens_per_s": learner_tps, "trained_tokens": trained,
        "mfu": 6 * params * learner_tps / peak,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-smoke"))
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides of the smoke run's config")
    args = parser.parse_args(argv)
    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        print("error: the GPU smoke benchmark needs a CUDA GPU (and the vllm extra); none is visible", file=sys.stderr)
        return 2
    import ray

    from pipelines.train import run

    args.out.mkdir(parents=True, exist_ok=True)
    model_dir, params = build_model(args.out / "model")
    device = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in device), PEAK_BF16["H100"])
    if gpus == 1:  # two logical GPUs on the one device: the engine's placement group and the learner share it
        os.environ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"
        ray.init(num_gpus=2, include_dashboard=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}})
    cfg = smoke_config(model_dir, args.out, gpus, args.overrides)
    started = time.perf_counter()
    run_dir = run(cfg)
    rows = RunDir(run_dir).read_metrics()
    result = {
        "device": device, "gpus": gpus, "sync_path": "nccl" if gpus > 1 else "object_store",
        "parameters": params, "peak_bf16_flops": peak, "wall_seconds": time.perf_counter() - started,
        "iterations": [iteration_figures(run_dir, row, params, peak) for row in rows],
    }
    (args.out / "gpu_smoke.json").write_text(json.dumps(result, indent=2))
    print(f"{device} x{gpus}, {params / 1e6:.0f}M parameters, sync over {result['sync_path']}:")
    for it in result["iterations"]:
        print(f"  iteration {it['iteration']}: sync {it['sync_seconds']:.2f} s ({(it['sync_bytes'] or 0) / 2**20:.0f} MiB, "
              f"probe |diff| {it['probe_abs_diff']:.1e}), generation {it['generation_tokens_per_s']:.0f} tok/s, "
              f"learner {it['learner_tokens_per_s']:.0f} tok/s, MFU {it['mfu']:.1%}")
    print(f"written: {args.out / 'gpu_smoke.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
