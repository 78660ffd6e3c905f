"""GPU smoke check in three stages, each run as far as the machine allows, into one JSON (<out>/gpu_smoke.json).

    python -m benchmarks.gpu_smoke [--out runs/gpu-smoke] [--stages A,B,C] [--tiny] [key.path=value ...]

- A, torch + transformers (+ pydantic) only: the learner's collectives under an NCCL group of one, in a child
  process that sees the GPU as Ray Train shows it to the learner of a one-GPU node; the bf16 matmul peak on
  random operands timed with CUDA events, against `sami.throughput.measure_peak_flops`; a Qwen2.5-0.5B-shaped
  model (random weights, vocabulary 151,936) through the learner's shared-prefix SAMI scoring against the padded
  C^2 path, bf16 and fp32, at C = 2, 4, 8; `HFEngine` generation at batch 64 and 256 and its probe log-prob
  against the learner's.
- B, with ray and deepspeed: `pipelines.train.run`, 2 iterations, one HF engine and one DeepSpeed bf16 learner
  on the one GPU, weight sync through the object store, at the paper presets' learner settings: ZeRO-3,
  `init: base` (iteration 2 re-trains the base), gradient accumulation (4 micro-batches a step); then the same
  under LoRA (`run_lora`).
- C, with vllm: the same run with a vLLM engine (over NCCL where there are 2 GPUs).
A stage whose packages or GPU are missing is recorded as skipped, with the reason; a step that fails is recorded
with its error and the rest goes on; the JSON is rewritten after every step. `--tiny` shrinks every stage to a
CPU dry run (tiny model and vocabulary, gloo), as the test suite runs it. docs/gpu.md: the commands for an
offline GPU machine. Nothing at module level imports more than the standard library.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

STAGES = {"A": ("torch", "transformers", "pydantic"), "B": ("ray", "deepspeed"), "C": ("vllm",)}
LORA = ["model.lora.enabled=true", "model.lora.rank=16"]  # stage B's second run: how a 70B learner fits
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)
# actors/weight_sync.py PROBE_TOLERANCE[torch.bfloat16], not imported: that module imports ray, which stage A must
# not need (tests/test_gpu_smoke.py checks the two agree)
BF16_PROBE_TOLERANCE = 5e-2


@dataclass(frozen=True)
class Sizes:
    """How big every stage runs: `REAL` on a GPU (A and B together within 10 minutes of an H200), `TINY` on a CPU."""

    model: dict  # Qwen2Config fields
    vocab: int  # the model's vocabulary: the world's words padded with filler words
    cs: tuple[int, ...]  # SAMI's C for the scoring check
    prompts_per_pass: int  # C x query groups per scoring pass (the groups: this // C, at least one)
    prompt_tokens: tuple[int, int]
    response_tokens: tuple[int, int]
    repeats: int  # timed scoring passes after one warm-up
    generation_batches: tuple[int, ...]
    new_tokens: int
    matmul_size: int
    matmuls_timed: int  # back-to-back matmuls between two CUDA events
    train: list[str] = field(default_factory=list)  # stage B's / C's config overrides


REAL = Sizes(QWEN2_05B, 151_936, (2, 4, 8), 8, (96, 160), (32, 64), 3, (64, 256), 64, 8192, 50, [
    "model.max_prompt_tokens=256", "model.max_response_tokens=64", "data.max_queries=256", "sampling.max_new_tokens=64",
    "sampling.batch_size=256", "optim.groups_per_step=64", "optim.micro_batch_groups=16", "schedule.steps_per_iteration=4",
    "deepspeed.bf16=true"])
TINY = Sizes(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=512, tie_word_embeddings=True), 1024, (2, 4, 8), 8, (12, 20), (4, 8), 1, (4, 8),
             8, 128, 3, [
    "model.max_prompt_tokens=128", "model.max_response_tokens=8", "data.max_queries=8", "sampling.max_new_tokens=8",
    "sampling.batch_size=8", "optim.groups_per_step=4", "optim.micro_batch_groups=2", "schedule.steps_per_iteration=1",
    "deepspeed.bf16=false", "scaling.gpus_per_learner=0", "checkpoint.export_hf=false"])


class Report:
    """The one JSON: each stage's steps as they finish, written again after every step."""

    def __init__(self, path: Path, header: dict):
        self.path, self.data = path, {**header, "stages": {}}
        self.write()

    def write(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2))

    def skip(self, stage: str, reason: str) -> None:
        self.data["stages"][stage] = {"skipped": reason}
        self.write()
        print(f"stage {stage}: skipped: {reason}", flush=True)

    def step(self, stage: str, name: str, run, *args) -> dict | None:
        """`run(*args)`'s figures under stage/name, or its error; the stage goes on either way."""
        self.data["stages"].setdefault(stage, {})[name] = {"running": "not finished"}  # what a timeout cut short
        self.write()
        started = time.perf_counter()
        try:
            figures = run(*args)
        except Exception as e:  # a figure of the check, not a crash of it: recorded, the next step runs
            figures = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:600]}"}
        figures["seconds"] = round(time.perf_counter() - started, 2)
        self.data["stages"][stage][name] = figures
        self.write()
        print(f"stage {stage} {name}: {json.dumps(figures)[:400]}", flush=True)
        return None if "error" in figures else figures


def missing_packages(stage: str) -> list[str]:
    """The packages a stage needs (its own and every earlier stage's) that cannot be imported here."""
    needed = [m for s in STAGES if s <= stage for m in STAGES[s]]
    return [m for m in needed if importlib.util.find_spec(m) is None]


def skip_reason(stage: str, tiny: bool, gpus: int) -> str | None:
    missing = missing_packages(stage)
    if missing:
        return f"not importable here: {', '.join(missing)} (docs/gpu.md: which wheels to carry)"
    if stage == "C" and tiny:
        return "the vLLM run has no CPU dry run in this environment (tests/vllm_lane runs vLLM on CPU)"
    if not tiny and gpus == 0:
        return "no CUDA GPU visible (--tiny runs the CPU dry run)"
    return None


# ---- the model every stage uses -------------------------------------------------------------------------------

def world_tokenizer(vocab_size: int):
    """The built-in world's word-level tokenizer, padded with filler words (" x<id>") to `vocab_size` entries: the
    embedding and LM head get their real shape, and whatever a random model writes decodes to words that
    re-tokenise to the same ids (the training loop tokenises responses from their text)."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import models

    from sami.tiny_model import SPECIAL_TOKENS, train_tokenizer
    from sami.world.base_model import vocabulary_texts

    trained = train_tokenizer(vocabulary_texts(), vocab_size=5000)
    vocab = trained.get_vocab()
    vocab.update({f"\u2581x{n}": n for n in range(len(vocab), vocab_size)})  # "▁": a word after a space (Metaspace)
    backend = trained.backend_tokenizer
    backend.model = models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def build_model(out: Path, sizes: Sizes, device: str) -> tuple[Path, int]:
    """A Qwen2 model of `sizes.model`'s shape with random bf16 weights (seed 0), saved with its tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = world_tokenizer(sizes.vocab)
    config = Qwen2Config(vocab_size=sizes.vocab, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **sizes.model)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: 0.5B parameters initialise slowly on a CPU
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


# ---- stage A: torch + transformers only -----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def learner_process(visible_devices: str, backend: str) -> dict:
    """A child process with the environment Ray Train gives the one learner of a one-GPU node (its GPU ids in
    CUDA_VISIBLE_DEVICES, ranks, the rendezvous), running the learner's collectives; its figures."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible_devices, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_WORLD_SIZE": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_smoke", "--learner-collectives", backend], env=env,
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"the learner process exited {out.returncode}: {out.stderr.strip()[-600:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def learner_collectives(backend: str) -> dict:
    """In the learner process: the collectives `sami.learner` and `pipelines/loop.py` run, under a process group
    of one built as Ray Train's TorchConfig builds it (`init_process_group(backend, "env://")`)."""
    import torch
    import torch.distributed as dist

    from sami.learner import every_rank_finite, stop_together

    figures = {"CUDA_VISIBLE_DEVICES": os.environ["CUDA_VISIBLE_DEVICES"], "devices_seen": torch.cuda.device_count()}
    if backend == "nccl":
        if not figures["devices_seen"]:
            return {**figures, "error": "torch sees no GPU in the learner's process"}
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # pipelines/loop.py: setup
        torch.cuda.set_device(device)
        figures["device_name"] = torch.cuda.get_device_name(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, init_method="env://", rank=0, world_size=1)

    def scatter() -> bool:
        received = [None]
        dist.scatter_object_list(received, [("shard", [1, 2])], src=0)
        return received[0] == ("shard", [1, 2])

    def on_device_sum() -> bool:  # Learner.train's totals
        totals = torch.tensor([3.0, 4.0], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        return totals.tolist() == [3.0, 4.0]

    checks = {"stop_together": lambda: stop_together(None) is None,
              "every_rank_finite": lambda: every_rank_finite(1.0) and not every_rank_finite(float("nan")),
              "scatter_object_list": scatter, "barrier": lambda: dist.barrier() is None, "all_reduce_on_device": on_device_sum}
    for name, check in checks.items():
        try:
            figures[name] = "ok" if check() else "wrong result"
        except Exception as e:  # what a learner would raise on its first GPU run: the figure itself
            figures[name] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    dist.destroy_process_group()
    return figures


def collectives(tiny: bool) -> dict:
    """The learner's collectives under NCCL (gloo in the CPU dry run), in a process that sees what Ray Train shows
    the learner of a one-GPU node: GPU id 0, the node's only one. Also what it sees with id 1, the second logical
    GPU a two-GPU placement hands the learner on a one-GPU node (issue 22, defect 2)."""
    if tiny:
        return {"gloo": learner_process("", "gloo")}
    return {"nccl": learner_process("0", "nccl"), "second_logical_gpu": learner_process("1", "nccl")}


def timed_matmuls_flops(device, dtype, size: int, count: int, fill: str) -> float:
    """FLOP/s of `count` back-to-back `size`^2 matmuls (after a warm-up) on random or zero operands: CUDA events on
    a GPU, the host clock on a CPU. Written apart from `measure_peak_flops`, to check it."""
    import torch

    generator = torch.Generator(device).manual_seed(1)
    a, b = ((torch.randn(size, size, device=device, dtype=dtype, generator=generator) if fill == "random"
             else torch.zeros(size, size, device=device, dtype=dtype)) for _ in range(2))
    for _ in range(3):
        torch.mm(a, b)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(count):
            torch.mm(a, b)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        started = time.perf_counter()
        for _ in range(count):
            torch.mm(a, b)
        seconds = time.perf_counter() - started
    return 2.0 * size**3 * count / seconds


def peak(device, sizes: Sizes) -> dict:
    import torch

    from sami.throughput import measure_peak_flops

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the learner's (sami/learner.py)
    flops = {fill: timed_matmuls_flops(device, dtype, sizes.matmul_size, sizes.matmuls_timed, fill)
             for fill in ("random", "zeros")}
    library = measure_peak_flops(device, dtype, size=sizes.matmul_size)
    return {"dtype": str(dtype), "size": sizes.matmul_size, "random_flops": flops["random"], "zeros_flops": flops["zeros"],
            "measure_peak_flops": library, "measure_peak_flops_over_random": library / flops["random"]}


def random_groups(c: int, sizes: Sizes, seed: int):
    """max(1, prompts_per_pass // C) query groups of random tokens (EOS closes each response), lengths seeded."""
    from sami.groups import QueryGroup

    rng = random.Random(seed)
    draw = lambda lengths, n: [[rng.randrange(4, sizes.vocab) for _ in range(rng.randint(*lengths))] for _ in range(n)]
    return [QueryGroup(query_id=f"q{g}", query="q", prompt_ids=draw(sizes.prompt_tokens, c),
                       response_ids=[r + [3] for r in draw(sizes.response_tokens, c)])  # 3: the world's </s>
            for g in range(max(1, sizes.prompts_per_pass // c))]


def sami_matrix_and_loss(model, groups, path: str, device):
    """The learner's [G, C, C] matrix and SAMI loss: `score_groups` (shared prefix) or the padded C^2 pairs."""
    from sami.scoring import score, score_groups
    from sami.logprobs import sequence_logprobs
    from sami.objectives import pair_sequences, sami_loss
    from sami.objectives import scoring as objective_scoring

    c = len(groups[0].prompt_ids)
    packed = objective_scoring("sami", c)
    if path == "shared_prefix":
        token_lp, mask, _ = score_groups(model, groups, packed, 0, True, device)
    else:
        token_lp, mask = score(model, *pair_sequences(groups, packed.pairs), 0, True, device)
    matrix = sequence_logprobs(token_lp, mask).view(len(groups), c, c)
    return matrix, sami_loss(matrix).loss


def scoring_path(model, groups, path: str, device, sizes: Sizes, peak_flops: float) -> tuple[dict, object, object]:
    """(figures, matrix, flat gradient) of forward + backward of the SAMI loss along `path`."""
    import torch

    from sami.scoring import forward_tokens
    from sami.objectives import scoring as objective_scoring
    from sami.throughput import matmul_parameters, training_flops

    cuda = device.type == "cuda"
    packed = objective_scoring("sami", len(groups[0].prompt_ids))
    # the tokens the learner counts for its rates: the batch it runs (shared prefix: each prompt once)
    tokens = forward_tokens(groups, packed)[0] if path == "shared_prefix" else \
        sum(len(g.prompt_ids[i]) + len(g.response_ids[j]) for g in groups for i, j in packed.pairs)
    seconds = []
    for attempt in range(sizes.repeats + 1):  # the first pass warms up
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        started = time.perf_counter()
        matrix, loss = sami_matrix_and_loss(model, groups, path, device)
        loss.backward()
        if cuda:
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    best = min(seconds[1:])
    gradient = torch.cat([p.grad.flatten().double() for p in model.parameters() if p.grad is not None])
    figures = {"tokens": tokens, "seconds": best, "tokens_per_s": tokens / best, "loss": loss.item(),
               "mfu": training_flops(matmul_parameters(model), tokens) / best / peak_flops,
               "peak_memory_gib": (torch.cuda.max_memory_allocated(device) - before) / 2**30 if cuda else None}
    return figures, matrix.detach().float(), gradient


def scoring(model_dir: Path, device, sizes: Sizes, dtype_name: str) -> dict:
    """Shared-prefix against padded C^2 scoring of one model in one dtype, at every C."""
    import torch
    from transformers import AutoModelForCausalLM

    from sami.throughput import measure_peak_flops

    dtype = getattr(torch, dtype_name)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)  # sdpa: takes the block mask
    model.train()
    peak_flops = measure_peak_flops(device, dtype, size=sizes.matmul_size)
    figures = {"peak_flops": peak_flops}
    for c in sizes.cs:
        groups = random_groups(c, sizes, seed=c)
        shared, shared_matrix, shared_gradient = scoring_path(model, groups, "shared_prefix", device, sizes, peak_flops)
        padded, padded_matrix, padded_gradient = scoring_path(model, groups, "padded", device, sizes, peak_flops)
        cosine = torch.nn.functional.cosine_similarity(shared_gradient, padded_gradient, dim=0).item()
        del shared_gradient, padded_gradient
        model.zero_grad(set_to_none=True)
        figures[f"C={c}"] = {
            "groups": len(groups), "shared_prefix": shared, "padded": padded,
            "matrix_max_abs_diff": (shared_matrix - padded_matrix).abs().max().item(),
            "loss_abs_diff": abs(shared["loss"] - padded["loss"]), "gradient_cosine": cosine,
            "speedup": padded["seconds"] / shared["seconds"]}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return figures


def generation(model_dir: Path, device, sizes: Sizes) -> dict:
    """`HFEngine` tokens/s per batch size, and its probe log-prob against the learner's way of scoring it
    (`sami.scoring.score`, as `Learner.probe_logprob`) on the same weights in bf16 and in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    from sami.config import ModelConfig, SamplingConfig
    from sami.scoring import score
    from sami.logprobs import sequence_logprobs
    from sami.rollout_engines import HFEngine

    engine = HFEngine(str(model_dir), ModelConfig(name_or_path=str(model_dir), dtype="bfloat16"), device=str(device))
    figures = {"engine_dtype": str(engine.dtype)}
    prompts = [f"Tell me about the {word} please ." for word in ("river", "garden", "market", "bridge")]
    for batch in sizes.generation_batches:
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=sizes.new_tokens, batch_size=batch)
        batch_prompts = [prompts[n % len(prompts)] for n in range(batch)]
        engine.generate(batch_prompts[:8], sampling, seeds=0)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        completions = engine.generate(batch_prompts, sampling, seeds=1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        generated = sum(len(c.token_ids) for c in completions)
        figures[f"batch={batch}"] = {"generated_tokens": generated, "seconds": seconds, "tokens_per_s": generated / seconds}
    tokenizer = engine.tokenizer
    probe = (tokenizer(prompts[0], add_special_tokens=False).input_ids, completions[0].token_ids + [tokenizer.eos_token_id])
    engine_lp = engine.sequence_logprob(*probe)
    figures.update(probe_tokens=len(probe[0]) + len(probe[1]), engine_logprob=engine_lp, tolerance_bf16=BF16_PROBE_TOLERANCE)
    del engine
    for dtype in (torch.bfloat16, torch.float32):  # the learner's bf16 weights, and the same weights in fp32
        learner = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        with torch.no_grad():
            token_lp, mask = score(learner, [probe[0]], [probe[1]], tokenizer.pad_token_id, True, device)
        diff = abs(sequence_logprobs(token_lp.float(), mask).item() - engine_lp)
        figures[f"probe_abs_diff_vs_learner_{str(dtype).removeprefix('torch.')}"] = diff
        figures[f"probe_within_tolerance_vs_learner_{str(dtype).removeprefix('torch.')}"] = diff <= BF16_PROBE_TOLERANCE
        del learner
    return figures


def stage_a(report: Report, out: Path, sizes: Sizes, tiny: bool) -> None:
    import torch

    device = torch.device("cpu") if tiny else torch.device("cuda", 0)
    model_dir = out / "model-A"

    def model() -> dict:
        return {"parameters": build_model(model_dir, sizes, str(device))[1], "vocab": sizes.vocab}

    report.step("A", "collectives", collectives, tiny)
    report.step("A", "peak", peak, device, sizes)
    if report.step("A", "model", model) is None:
        return
    for dtype_name in ("bfloat16", "float32"):
        report.step("A", f"scoring_{dtype_name}", scoring, model_dir, device, sizes, dtype_name)
    report.step("A", "generation", generation, model_dir, device, sizes)


# ---- stages B and C: the training job -------------------------------------------------------------------------

def smoke_config(model_dir: Path, out: Path, engine: str, gpus: int, overrides: list[str]):
    """The 2-iteration SAMI run: one `engine` rollout engine, one DeepSpeed ZeRO-3 learner that re-trains the base
    every iteration (`init: base`, as the paper's presets) and accumulates micro-batches; on one GPU both share
    it and the weights go through the object store (NCCL refuses two ranks on one device): a vLLM engine and the
    learner each reserve half of it (one Ray GPU id, 0, for both), an HF engine reserves none and sees the device
    (`start_ray`)."""
    from sami.config import load_config

    shared = gpus <= 1
    halves = gpus == 1 and engine == "vllm"
    return load_config(None, [
        f"run.output_dir={out}", "run.name=gpu-smoke", "run.iterations=2",
        f"model.name_or_path={model_dir}", "model.dtype=auto",
        "data.source=world", "data.task=world", "data.heldout_queries=0",
        "principles.source=world", "principles.mode=sample_k", "principles.principles_per_constitution=3",
        "sampling.temperature=1.0", f"rollout.engine={engine}", "rollout.num_engines=1",
        f"rollout.gpu_memory_utilization={0.35 if shared else 0.8}",
        f"rollout.weight_sync={'object_store' if shared or engine == 'hf' else 'auto'}",
        "objective.name=sami", "optim.lr=1.0e-6", "schedule.init=base",
        "deepspeed.zero_stage=3", "checkpoint.deepspeed=false",
        # the first failure is the figure: no restarts of the learner into it (each would cost a minute or more)
        "scaling.num_learners=1", "scaling.cpus_per_learner=1", "scaling.max_learner_failures=0",
        # 0 GPUs on a CPU dry run: the hf engine takes rollout.gpus_per_engine too (a GPU it asked for never comes)
        f"scaling.gpus_per_learner={0.5 if halves else min(gpus, 1)}",
        f"rollout.gpus_per_engine={0.5 if halves else min(gpus, 1)}",
        *overrides,
    ])


def iteration_figures(run_dir: Path, row: dict) -> dict:
    """One iteration's figures from its metrics row (the learner's own token count, `forward_tokens` over the
    micro-batches it ran, and its measured peak) and its query groups (the tokens generated)."""
    import pyarrow.parquet as pq

    from sami.run_dir import RunDir

    groups = pq.read_table(RunDir(run_dir).groups(row["iteration"])).to_pylist()
    generated = round(sum(g["response_tokens"] * len(g["responses"]) for g in groups))  # a mean per response
    return {
        "iteration": row["iteration"],
        "sync_seconds": row["time_sync"], "sync_bytes": row.get("sync_bytes"), "probe_abs_diff": row["probe_abs_diff"],
        "generation_tokens_per_s": generated / row["time_generate"], "generated_tokens": generated,
        "learner_tokens_per_s": row["learner_tokens_per_second"],
        # the rate is over the time the learner trained, not the time it waited for groups
        "trained_tokens": round(row["learner_tokens_per_second"] * (row["time_train"] - row["time_wait_groups"])),
        "learner_peak_flops": row["peak_flops"], "mfu": row["mfu"],
    }


def start_ray(gpus: int, engine: str) -> None:
    """A local Ray without its dashboard (the offline GPU machine has none of the dashboard's dependencies, e.g.
    aiohttp), its GPUs as they are: on one GPU the shares of `smoke_config` give the engine and the learner Ray GPU
    id 0, so Ray Train's CUDA_VISIBLE_DEVICES names a device that exists (issue 22, defect 2). An HF engine
    reserves no GPU, so Ray would hide the device from it: it is left visible to every process there."""
    import ray

    from actors.ray_session import LOCAL_ENV

    env = {**LOCAL_ENV, **({} if gpus else {"DS_ACCELERATOR": "cpu"})}  # DeepSpeed would look for CUDA
    if gpus and engine == "hf":
        env["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"
    os.environ.update(env)
    # logical CPUs for the learner, the engine and Ray Train's own actors (the 2-CPU starvation deadlock)
    ray.init(num_cpus=max(os.cpu_count() or 1, 8), include_dashboard=False, runtime_env={"env_vars": env})


def training_run(out: Path, sizes: Sizes, engine: str, tiny: bool, overrides: list[str]) -> dict:
    import torch

    from pipelines.train import run
    from sami.run_dir import RunDir

    gpus = 0 if tiny else torch.cuda.device_count()
    model_dir, params = build_model(out / "model", sizes, "cpu")  # the driver keeps off the GPU
    start_ray(gpus, engine)
    started = time.perf_counter()
    run_dir = run(smoke_config(model_dir, out / "run", engine, gpus, sizes.train + overrides))
    rows = RunDir(run_dir).read_metrics()
    return {"engine": engine, "gpus": gpus, "sync_path": "object_store" if gpus <= 1 or engine == "hf" else "nccl",
            "parameters": params, "wall_seconds": time.perf_counter() - started,
            "iterations": [iteration_figures(run_dir, row) for row in rows]}


def child_stage(stage: str, out: Path, tiny: bool, overrides: list[str]) -> dict:
    """Stage B's or C's run in a process of its own (each starts and ends its own Ray); its figures."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "benchmarks.gpu_smoke", "--run-training", stage, "--out", str(out),
               *(["--tiny"] if tiny else []), *overrides]
    log = out / "output.log"
    with open(log, "w") as f:  # written as it runs: a run cut short keeps its output
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {log.read_text().strip()[-600:]} (whole output: {log})")
    return json.loads((out / "figures.json").read_text())


# ---- the command --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-smoke"))
    parser.add_argument("--stages", default="A,B,C", help="comma-separated, of A, B, C (default: all)")
    parser.add_argument("--tiny", action="store_true", help="every stage as a CPU dry run (tiny model, gloo)")
    parser.add_argument("--learner-collectives", metavar="BACKEND", help=argparse.SUPPRESS)
    parser.add_argument("--run-training", metavar="STAGE", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides of stage B's and C's run")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no loading bars in the figures' output
    if args.learner_collectives:
        print(json.dumps(learner_collectives(args.learner_collectives)))
        return 0
    if args.run_training:
        figures = training_run(args.out, TINY if args.tiny else REAL, {"B": "hf", "C": "vllm"}[args.run_training],
                               args.tiny, args.overrides)
        (args.out / "figures.json").write_text(json.dumps(figures, indent=2))
        return 0
    stages = [s.strip().upper() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        print(f"error: --stages: {args.stages!r}: pick from A, B, C (e.g. --stages A,B)", file=sys.stderr)
        return 2
    import torch

    gpus = torch.cuda.device_count()
    sizes = TINY if args.tiny else REAL
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out / "gpu_smoke.json", {
        "tiny": args.tiny, "stages_asked": stages, "gpus": gpus,
        "device": torch.cuda.get_device_name(0) if gpus else "cpu", "torch": torch.__version__,
        "python": sys.version.split()[0]})
    started = time.perf_counter()
    for stage in stages:
        reason = skip_reason(stage, args.tiny, gpus)
        if reason is not None:
            report.skip(stage, reason)
        elif stage == "A":
            stage_a(report, args.out, sizes, args.tiny)
        else:
            report.step(stage, "run", child_stage, stage, args.out / f"stage-{stage}", args.tiny, args.overrides)
            if stage == "B":
                report.step(stage, "run_lora", child_stage, stage, args.out / "stage-B-lora", args.tiny,
                            [*LORA, *args.overrides])
    report.data["wall_seconds"] = round(time.perf_counter() - started, 1)
    report.write()
    print(f"written: {report.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
