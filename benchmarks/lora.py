"""Full fine-tuning against LoRA (rank 8 and 64), side by side in one run: learner peak memory, bytes and seconds per
weight sync, with SAMI's exact KL on (so full fine-tuning holds its reference model, LoRA its base with the adapter
off).

    .venv/bin/python -m benchmarks.lora --out /tmp/bench-lora

A Llama-shaped model of a CPU's realistic size (hidden 512, 8 layers, 8 heads, MLP 1376, 32k vocabulary: 58M
parameters), random weights. Each arm runs in a process of its own (its peak RSS is the learner's alone): one
DeepSpeed ZeRO-2 learner (CPU, gloo, world size 1) trains 2 optimiser steps of 2 query groups (C = 2, 64-token
prompts, 32-token responses), then syncs into an HF engine in the same process 3 times: the object-store path
(`state_dict_buckets` of what `WeightSync.push` sends, `ray.put`, `ray.get` and `HFEngine.update_weights`) within one
node of a local Ray, without the actor call.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ARMS = {"full": [], "lora-r8": ["model.lora.enabled=true", "model.lora.rank=8"],
        "lora-r64": ["model.lora.enabled=true", "model.lora.rank=64"]}
SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=32000)


def build_model(out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sami.tiny_model import train_tokenizer

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    tokenizer = train_tokenizer(["the a an and of to in is it you that he was for on are with as"], vocab_size=200)
    LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def arm(model: str, overrides: list[str]) -> dict:
    """One arm, in this process: the learner's peak memory, then 3 syncs into an HF engine."""
    import numpy as np
    import ray
    import torch

    from actors.weight_sync import state_dict_buckets
    from sami.config import load_config
    from sami.groups import QueryGroup
    from sami.learner import Learner, single_rank_group
    from sami.lora import sync_tensors
    from sami.rollout_engines import HFEngine

    torch.set_num_threads(1)
    single_rank_group()
    before = peak_rss_mib()
    cfg = load_config(None, [f"model.name_or_path={model}", "scaling.num_learners=1", "optim.groups_per_step=2",
                             "optim.micro_batch_groups=2", "schedule.steps_per_iteration=2", "optim.lr=1e-4",
                             "objective.kl_beta=0.1", "objective.kl_estimator=exact", "checkpoint.deepspeed=false",
                             *overrides])
    learner = Learner(cfg, model, 1, torch.device("cpu"), use_gpu=False)
    rng = np.random.default_rng(0)
    tokens = lambda n: rng.integers(5, 200, n).tolist()
    groups = [QueryGroup(f"q{g}", "x", prompt_ids=[tokens(64) for _ in range(2)], response_ids=[tokens(32) for _ in range(2)])
              for g in range(2)]
    started = time.perf_counter()
    learner.train(1, groups)
    train_seconds = time.perf_counter() - started
    learner_peak = peak_rss_mib()
    trained = sum(p.numel() for p in learner.module.parameters() if p.requires_grad)
    engine = HFEngine(model, cfg.model, device="cpu")
    probe = (tokens(64), tokens(32))
    seconds, nbytes = [], 0
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    for _ in range(3):
        started = time.perf_counter()
        buckets = state_dict_buckets(sync_tensors(learner.module), cfg.rollout.sync_bucket_mb)
        engine.update_weights(ray.get(ray.put(buckets)))
        seconds.append(time.perf_counter() - started)
        nbytes = sum(a.nbytes for b in buckets for a in b.values())
    diff = abs(engine.sequence_logprob(*probe) - learner.probe_logprob(probe))
    ray.shutdown()
    return {"trained_parameters": trained, "parameters": sum(p.numel() for p in learner.module.parameters()),
            "rss_before_learner_mib": round(before), "learner_peak_rss_mib": round(learner_peak),
            "train_seconds_2_steps": round(train_seconds, 2), "sync_bytes": nbytes,
            "sync_seconds_median": round(sorted(seconds)[1], 4), "probe_abs_diff": diff}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/bench-lora")
    parser.add_argument("--arm", choices=sorted(ARMS), help=argparse.SUPPRESS)  # one arm, in a child process
    args = parser.parse_args(argv)
    out = Path(args.out)
    model = str(build_model(out / "model"))
    if args.arm:
        print(json.dumps(arm(model, ARMS[args.arm])))
        return
    results = {}
    for name in ARMS:
        child = subprocess.run([sys.executable, "-m", "benchmarks.lora", "--out", str(out), "--arm", name],
                               capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        results[name] = json.loads(child.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("| | trained parameters | learner peak RSS | bytes per sync | seconds per sync | probe diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['trained_parameters']:,} of {r['parameters']:,} | {r['learner_peak_rss_mib']} MiB "
              f"({r['learner_peak_rss_mib'] - r['rss_before_learner_mib']} MiB over the process before the learner) | "
              f"{r['sync_bytes'] / 2**20:.2f} MiB | {r['sync_seconds_median']:.3f} | {r['probe_abs_diff']:.1e} |")


if __name__ == "__main__":
    main()
