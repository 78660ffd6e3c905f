"""SAMI's C x C scoring, forward + backward, three ways side by side on one model and one set of groups.

    python -m benchmarks.sami_scoring [--json] [--cs 2 4 8] [--repeats 3] [--threads N]

- `reference`: the reference implementation's approach (janphilippfranken/sami): C^2 sequences
  `[prompt_i, response_j]` right-padded into one batch, the model's full logits and `log_softmax`.
- `chunked`: the same C^2 padded sequences through `sami.logprobs.token_logprobs` (the learner until now).
- `shared_prefix`: `sami.logprobs.shared_prefix_logprobs`, C packed sequences `[prompt_i, response_1..C]`.

Model: Llama-style, hidden 256, 4 layers, 4 heads, vocabulary 32k, float32, random weights (seed 0). One
query group per C: prompts of 256 +- 16 tokens, responses of 128-256 tokens (seeded). Each approach and C
runs in a fresh process: a warm-up pass, then `--repeats` timed passes (median). Tokens per second count
the C^2 pairs' tokens, sum over (i, j) of len(prompt_i) + len(response_j), the same work for every approach.
Wall time is what `tokens_per_s` divides by; on a shared machine the process's CPU time (`cpu_seconds`,
`cpu_speedup`) is steadier. Peak memory is the process's max RSS (`getrusage`) during the passes minus its RSS with the model loaded.
`max_abs_diff` is the largest difference of the approach's C x C matrix (mean log-prob per response token)
from the reference's.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time

import torch

APPROACHES = ("reference", "chunked", "shared_prefix")
VOCAB, PROMPT, RESPONSE = 32000, (240, 272), (128, 256)


def model_and_group(c: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    rng = random.Random(c)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(*PROMPT))] for _ in range(c)]
    responses = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(*RESPONSE) - 1)] + [2] for _ in range(c)]
    return LlamaForCausalLM(config), prompts, responses


def matrix(approach: str, model, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
    """The C x C matrix L[i, j] = mean log p(response_j | prompt_i) per response token."""
    from sami.logprobs import collate_sequences, sequence_logprobs, shared_prefix_logprobs, token_logprobs
    from sami.objectives import OBJECTIVES

    c = len(prompts)
    if approach == "shared_prefix":
        token_lp, mask = shared_prefix_logprobs(model, [(prompts, responses)], pad_id=0)
        return sequence_logprobs(token_lp, mask).view(c, c)
    pairs = OBJECTIVES["sami"].pairs(c)
    batch = collate_sequences([prompts[i] for i, _ in pairs], [responses[j] for _, j in pairs], pad_id=0)
    if approach == "chunked":
        token_lp = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        token_lp = logits.float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return sequence_logprobs(token_lp, batch["response_mask"]).view(c, c)


def measure(approach: str, c: int, repeats: int) -> dict:
    """One approach at one C, in this process: forward + backward of the SAMI loss."""
    from sami.objectives import sami_loss

    model, prompts, responses = model_and_group(c)
    tokens = sum(len(p) + len(r) for p in prompts for r in responses)
    loaded_kib = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() // 1024
    seconds, cpu_seconds = [], []
    for _ in range(repeats + 1):  # the first pass warms up
        model.zero_grad(set_to_none=True)
        started, cpu_started = time.perf_counter(), time.process_time()
        scores = matrix(approach, model, prompts, responses)
        sami_loss(scores).loss.backward()
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"approach": approach, "C": c, "tokens": tokens, "seconds": statistics.median(seconds[1:]),
            "tokens_per_s": tokens / statistics.median(seconds[1:]),
            "cpu_seconds": statistics.median(cpu_seconds[1:]), "peak_mib": (peak_kib - loaded_kib) / 1024,
            "matrix": scores.detach().tolist()}


def run(approach: str, c: int, repeats: int, threads: int | None) -> dict:
    # max RSS is a per-process high-water mark: each approach and C gets a fresh process
    out = subprocess.run([sys.executable, "-m", "benchmarks.sami_scoring", "--one", approach, str(c),
                          "--repeats", str(repeats), *(["--threads", str(threads)] if threads else [])],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true", help="one JSON object per approach and C")
    parser.add_argument("--cs", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads per process (default: torch's choice)")
    parser.add_argument("--one", nargs=2, metavar=("APPROACH", "C"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.repeats)))
        return
    rows = []
    for c in args.cs:
        results = {a: run(a, c, args.repeats, args.threads) for a in APPROACHES}
        reference = torch.tensor(results["reference"]["matrix"])
        for a in APPROACHES:
            r = results[a]
            row = {"approach": a, "C": c, "tokens_per_s": round(r["tokens_per_s"], 1), "peak_mib": round(r["peak_mib"], 1),
                   "max_abs_diff": (torch.tensor(r["matrix"]) - reference).abs().max().item(),
                   "seconds": round(r["seconds"], 3), "cpu_seconds": round(r["cpu_seconds"], 3), "tokens": r["tokens"],
                   "speedup": round(r["tokens_per_s"] / results["reference"]["tokens_per_s"], 2),
                   "cpu_speedup": round(results["reference"]["cpu_seconds"] / r["cpu_seconds"], 2),
                   "memory_ratio": round(results["reference"]["peak_mib"] / r["peak_mib"], 2)}
            rows.append(row)
            print(json.dumps(row) if args.json else
                  f"C={c}  {a:13} {row['tokens_per_s']:9.0f} tok/s  {row['seconds']:7.2f} s  {row['peak_mib']:8.0f} MiB  "
                  f"x{row['speedup']:<5} speed (x{row['cpu_speedup']:<5} in CPU time)  x{row['memory_ratio']:<6} less memory  max|diff| {row['max_abs_diff']:.1e}",
                  flush=True)


if __name__ == "__main__":
    main()
