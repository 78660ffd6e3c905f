"""The learner at the paper's settings: ZeRO-3, gradient accumulation, `init: base`, LoRA, several ranks (real
DeepSpeed on CPU over gloo, the tiny model; no Ray).

Each test fails on a learner that computes the loss beside DeepSpeed's forward: ZeRO-3 then keeps only the last
micro-batch's gradient (it counts micro-steps in `DeepSpeedEngine.forward` only), `init: base` loads a state dict
into partitioned parameters (which hold no data), and two ranks whose groups need a different number of LM-head
chunks wait for each other in different collectives forever.
"""
import os
import socket
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from sami.config import load_config
from sami.groups import QueryGroup, tokenise_pairs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPTS = [["Constitution:\n1. Be polite.\n\nQuery: the river\nResponse:",
            "Constitution:\n1. Be curt.\n\nQuery: the river\nResponse:"],
           ["Constitution:\n1. Be concise.\n\nQuery: the mountain\nResponse:",
            "Constitution:\n1. Be verbose.\n\nQuery: the mountain\nResponse:"]]
RESPONSES = [["Please note, the river is long.", "The river is long."],
             ["The mountain is tall.", "The mountain is tall and old and cold."],
             ["Please, the mountain is old.", "It is cold."],
             ["The river is cold and long and old.", "Note the river."]]


def groups(tokenizer, count: int = 4, long_words: int = 0) -> list[QueryGroup]:
    """`count` tokenised groups of C = 2; `long_words` > 0 makes the last one that long (more LM-head chunks)."""
    out = []
    for n in range(count):
        responses = list(RESPONSES[n % len(RESPONSES)])
        if long_words and n == count - 1:
            responses = [" ".join(["the river is long"] * (long_words // 4)), "the mountain is old and cold " * 40]
        prompt_ids, response_ids = tokenise_pairs(tokenizer, PROMPTS[n % 2], responses)
        out.append(QueryGroup(f"q{n}", "x", prompt_ids=prompt_ids, response_ids=response_ids))
    return out


def settings(*overrides):
    return load_config(None, ["scaling.num_learners=1", "optim.groups_per_step=4", "optim.lr=1e-2",
                              "objective.kl_beta=0", "schedule.steps_per_iteration=1", *overrides])


def learner(tiny_model_dir, world_size: int = 1, *overrides):
    from sami.learner import Learner

    return Learner(settings(*overrides), str(tiny_model_dir), world_size, torch.device("cpu"), use_gpu=False)


def weights(one) -> dict[str, torch.Tensor]:
    """Every parameter of the policy, whole (gathered under ZeRO-3)."""
    from sami.learner import full_parameters

    with full_parameters(one.module, one.cfg.deepspeed.zero_stage):
        return {name: p.detach().clone() for name, p in one.module.named_parameters()}


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def one_step(tiny_model_dir, *overrides) -> dict[str, torch.Tensor]:
    one = learner(tiny_model_dir, 1, *overrides)
    one.train(1, groups(one.tokenizer))
    return weights(one)


def test_zero3_accumulates_every_micro_batch(process_group, tiny_model_dir, one_thread):
    """One optimiser step of 4 groups: ZeRO-3 with accumulation 4 equals ZeRO-2's, and both one micro-batch of 4.

    AdamW's first step moves a weight by about lr * g / (|g| + 1e-8): where a gradient is near 1e-8, the rounding of
    a sum taken in another order moves it by up to 3% of lr (measured). At lr 1e-4 that is 3e-6, while a step on the
    last micro-batch's gradient alone moves weights by up to 2 x lr = 2e-4: 20 times the tolerance."""
    lr = "optim.lr=1e-4"
    base = weights(learner(tiny_model_dir, 1))
    whole = one_step(tiny_model_dir, lr, "optim.micro_batch_groups=4", "deepspeed.zero_stage=2")
    zero2 = one_step(tiny_model_dir, lr, "optim.micro_batch_groups=1", "deepspeed.zero_stage=2")
    zero3 = one_step(tiny_model_dir, lr, "optim.micro_batch_groups=1", "deepspeed.zero_stage=3")
    assert largest_difference(whole, base) > 9e-5  # the step moved the weights (AdamW's first step: about lr)
    assert largest_difference(zero2, whole) < 1e-5
    assert largest_difference(zero3, whole) < 1e-5


@pytest.mark.parametrize("stage,lora", [(2, False), (3, False), (2, True), (3, True)])
def test_init_base_trains_every_iteration_from_the_base(process_group, tiny_model_dir, one_thread, stage, lora):
    """Three iterations of `init: base` on the same groups give the same weights: each starts from the base (and a
    fresh optimiser), under ZeRO-2, ZeRO-3 and LoRA on both."""
    lora_settings = ["model.lora.enabled=true", "model.lora.rank=4", "model.lora.export_merged=false"] if lora else []
    one = learner(tiny_model_dir, 1, "schedule.init=base", f"deepspeed.zero_stage={stage}",
                  "optim.micro_batch_groups=2", *lora_settings)
    batch, base, after = groups(one.tokenizer), weights(one), []
    for iteration in (1, 2, 3):
        one.train(iteration, batch)
        after.append(weights(one))
    assert largest_difference(after[0], base) > 5e-3
    assert largest_difference(after[1], after[0]) < 1e-6 and largest_difference(after[2], after[0]) < 1e-6


# two steps (the groups cycle); lr 1e-4 as in test_zero3_accumulates_every_micro_batch, for the same reason
TWO_RANK_SETTINGS = ("schedule.steps_per_iteration=2", "optim.lr=1e-4")


def two_rank_main(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    """One learner rank of a world of 2: rank 0 trains a short group, rank 1 a long one (two LM-head chunks)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    try:
        import deepspeed

        from sami.deepspeed_compat import skip_cpu_shm_comm_op

        skip_cpu_shm_comm_op()
        deepspeed.init_distributed(dist_backend="gloo")
        one = learner(model_dir, 2, "scaling.num_learners=2", "optim.groups_per_step=2", "deepspeed.zero_stage=3",
                      *TWO_RANK_SETTINGS)
        mine = groups(one.tokenizer, count=2, long_words=600)[rank]
        one.train(1, [mine])
        trained = weights(one)
        if rank == 0:
            torch.save(trained, os.path.join(out_dir, "weights.pt"))
    except Exception:
        with open(os.path.join(out_dir, f"error-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_zero3_ranks_with_different_lengths_equal_one_rank_on_both(process_group, tiny_model_dir, tmp_path,
                                                                        one_thread):
    context = mp.start_processes(two_rank_main, args=(free_port(), str(tiny_model_dir), str(tmp_path)), nprocs=2,
                                 start_method="spawn", join=False)
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("two ZeRO-3 ranks with different response lengths did not finish in 240 s (a hang)")
    errors = [p.read_text() for p in tmp_path.glob("error-*.txt")]
    assert not errors, errors[0]
    one = learner(tiny_model_dir, 1, "optim.groups_per_step=2", "optim.micro_batch_groups=2", "deepspeed.zero_stage=2",
                  *TWO_RANK_SETTINGS)
    both = groups(one.tokenizer, count=2, long_words=600)
    assert sum(map(len, both[1].response_ids)) * 2 > 512 > sum(map(len, both[0].response_ids)) * 2  # 2 chunks vs 1
    one.train(1, both)
    two_ranks = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert largest_difference(two_ranks, weights(one)) < 1e-5
