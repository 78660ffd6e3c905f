"""benchmarks/gpu_smoke.py on a machine without a GPU: every stage's CPU dry run (`--tiny`), stage A with ray,
deepspeed and vllm unimportable (the offline GPU machine has none of them), the skips, the figures' sources."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from benchmarks.gpu_smoke import BF16_PROBE_TOLERANCE, REAL, iteration_figures, main, smoke_config, world_tokenizer
from sami.groups import QueryGroup
from sami.scoring import forward_tokens
from sami.objectives import scoring
from sami.run_dir import RunDir

REPO = Path(__file__).resolve().parents[1]
# Put first on PYTHONPATH, it hides ray, deepspeed and vllm from every process of the run (its children too):
# importlib finds none of them, as on the offline GPU machine, where only torch, transformers and the carried
# pydantic wheels exist. Their absence is what is simulated; everything else runs for real.
WITHOUT_RAY_DEEPSPEED_VLLM = '''
import sys
HIDDEN = {"ray", "deepspeed", "vllm"}

class Hiding:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return self.finder.find_spec(name, path, target) if hasattr(self.finder, "find_spec") else None

    def __getattr__(self, attribute):
        return getattr(self.finder, attribute)

sys.meta_path[:] = [Hiding(f) for f in sys.meta_path]
'''


def gpu_smoke(args: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_smoke", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_help_runs_without_a_gpu():
    out = gpu_smoke(["--help"], timeout=60)
    assert out.returncode == 0 and "three stages" in out.stdout and "--tiny" in out.stdout


def test_one_gpu_shares_it_through_the_object_store_two_use_nccl(tmp_path):
    hf, shared, split = (smoke_config(tmp_path, tmp_path, engine, gpus, REAL.train)
                         for engine, gpus in (("hf", 1), ("vllm", 1), ("vllm", 2)))
    assert (hf.rollout.weight_sync, shared.rollout.weight_sync, split.rollout.weight_sync) == (
        "object_store", "object_store", "auto")
    assert (hf.rollout.engine, split.rollout.engine) == ("hf", "vllm")
    assert hf.deepspeed.bf16 is True and hf.scaling.gpus_per_learner == 1 and hf.run.iterations == 2
    # one GPU and a vLLM engine: half each, so both get Ray GPU id 0 (issue 22, defect 2); two GPUs: one each
    assert (shared.rollout.gpus_per_engine, shared.scaling.gpus_per_learner) == (0.5, 0.5)
    assert (split.rollout.gpus_per_engine, split.scaling.gpus_per_learner) == (1, 1)


def test_the_padded_vocabulary_round_trips_what_a_random_model_writes():
    """The training loop tokenises responses from their text: random ids (fillers and the world's words) must
    decode to text that tokenises back to the same ids."""
    tokenizer = world_tokenizer(2000)
    ids = random.Random(0).sample(range(4, 2000), 60) + random.Random(1).sample(range(4, 300), 20)
    assert len(tokenizer) == 2000
    assert tokenizer(" " + tokenizer.decode(ids), add_special_tokens=False).input_ids == ids


def test_stage_a_holds_the_weight_syncs_bf16_tolerance():
    from actors.weight_sync import PROBE_TOLERANCE

    assert BF16_PROBE_TOLERANCE == PROBE_TOLERANCE[torch.bfloat16]


def test_the_learner_figures_are_the_learners_own_token_count(tmp_path):
    """At C = 2 the learner runs each prompt once with both responses behind it: 5 + 7 + 2 x (3 + 4) = 26 tokens,
    not the 38 of the four (prompt, response) pairs; the figures are the learner's, from its metrics row."""
    group = QueryGroup(query_id="q", query="q", responses=["a b c", "d e f g"], response_tokens=3.5,
                       prompt_ids=[[1] * 5, [1] * 7], response_ids=[[2] * 3, [2] * 4])
    RunDir(tmp_path).iteration(1).mkdir()
    pq.write_table(pa.Table.from_pylist([group.record()]), RunDir(tmp_path).groups(1))
    tokens = forward_tokens([group], scoring("sami", 2))[0]
    row = {"iteration": 1, "time_sync": 0.5, "sync_bytes": 1000, "probe_abs_diff": 0.0, "time_generate": 1.0,
           "time_train": 2.5, "time_wait_groups": 0.5, "learner_tokens_per_second": tokens / 2.0, "peak_flops": 1e12,
           "mfu": 0.25}  # the rate over the 2 s the learner trained, not the 0.5 s it waited for groups
    figures = iteration_figures(tmp_path, row)
    assert tokens == 26
    assert (figures["trained_tokens"], figures["learner_tokens_per_s"]) == (26, 13.0)
    assert (figures["mfu"], figures["learner_peak_flops"], figures["generated_tokens"]) == (0.25, 1e12, 7)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skips where there is no GPU")
def test_without_a_gpu_each_stage_records_why_it_skipped(tmp_path):
    assert main(["--out", str(tmp_path), "--stages", "A,B"]) == 0
    stages = json.loads((tmp_path / "gpu_smoke.json").read_text())["stages"]
    assert stages == {s: {"skipped": "no CUDA GPU visible (--tiny runs the CPU dry run)"} for s in "AB"}


def test_unknown_stages_are_one_line(capsys):
    assert main(["--stages", "A,D"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --stages: 'A,D'") and err.count("\n") == 1


def test_stage_a_dry_run_needs_neither_ray_nor_deepspeed_nor_vllm(tmp_path):
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "sitecustomize.py").write_text(WITHOUT_RAY_DEEPSPEED_VLLM)
    out = gpu_smoke(["--tiny", "--out", str(tmp_path / "out")], env={"PYTHONPATH": f"{tmp_path / 'hide'}:{REPO}"})
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "gpu_smoke.json").read_text())
    a, stages = report["stages"]["A"], report["stages"]
    assert stages["B"] == {"skipped": "not importable here: ray, deepspeed (docs/gpu.md: which wheels to carry)"}
    assert stages["C"] == {"skipped": "not importable here: ray, deepspeed, vllm (docs/gpu.md: which wheels to carry)"}
    assert not [step for step, figures in a.items() if "error" in figures], a
    assert {k: v for k, v in a["collectives"]["gloo"].items() if k != "CUDA_VISIBLE_DEVICES"} == {
        "devices_seen": 0, "stop_together": "ok", "every_rank_finite": "ok", "scatter_object_list": "ok", "barrier": "ok",
        "all_reduce_on_device": "ok"}
    assert a["peak"]["random_flops"] > 0 and a["peak"]["measure_peak_flops"] > 0
    for dtype, matrix_bound in (("float32", 1e-5), ("bfloat16", 5e-2)):
        for c in (2, 4, 8):
            at = a[f"scoring_{dtype}"][f"C={c}"]
            assert at["matrix_max_abs_diff"] < matrix_bound and at["gradient_cosine"] > 0.999, (dtype, c, at)
            # shared prefix: each prompt once; padded: every one of the C^2 pairs
            assert at["shared_prefix"]["tokens"] < at["padded"]["tokens"]
    generation = a["generation"]
    assert generation["batch=4"]["generated_tokens"] > 0 and generation["batch=8"]["tokens_per_s"] > 0
    assert generation["probe_abs_diff_vs_learner_bfloat16"] == 0.0  # the same bf16 weights, the same code
    assert 0.0 < generation["probe_abs_diff_vs_learner_float32"] < BF16_PROBE_TOLERANCE


@pytest.mark.timeout(900)
def test_stage_b_dry_run_trains_two_iterations_through_ray_and_deepspeed(tmp_path):
    out = gpu_smoke(["--tiny", "--stages", "B", "--out", str(tmp_path)], timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    run = json.loads((tmp_path / "gpu_smoke.json").read_text())["stages"]["B"]["run"]
    assert "error" not in run, run
    assert (run["engine"], run["sync_path"]) == ("hf", "object_store")
    assert [it["iteration"] for it in run["iterations"]] == [1, 2]
    groups = [QueryGroup.from_record(r) for r in pq.read_table(
        RunDir(tmp_path / "stage-B" / "run").groups(1)).to_pylist() if not r["reject_reason"]]
    # the learner's micro-batches (TINY: 1 step of 2 micro-batches of 2 groups), in the order it cycles them
    expected = sum(forward_tokens([groups[i % len(groups)] for i in range(start, start + 2)], scoring("sami", 2))[0]
                   for start in (0, 2))
    first = run["iterations"][0]
    assert first["trained_tokens"] == expected
    assert first["sync_bytes"] == 4 * run["parameters"]  # fp32 on a CPU, every parameter once
    assert first["probe_abs_diff"] < 1e-4 and 0.0 < first["mfu"] < 1.0
    # the same paper settings (ZeRO-3, init: base, 2 micro-batches a step) under LoRA: the adapter alone moves
    lora = json.loads((tmp_path / "gpu_smoke.json").read_text())["stages"]["B"]["run_lora"]
    assert "error" not in lora, lora
    assert all(it["probe_abs_diff"] < 1e-4 and 0 < it["sync_bytes"] < run["parameters"] for it in lora["iterations"])
