"""benchmarks/gpu_smoke.py on a machine without a GPU: its help, its configs, and a one-line refusal."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_smoke import main, smoke_config

REPO = Path(__file__).resolve().parents[1]


def test_help_runs_without_a_gpu():
    out = subprocess.run([sys.executable, "-m", "benchmarks.gpu_smoke", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "2 SAMI iterations" in out.stdout


def test_one_gpu_shares_it_through_the_object_store_two_use_nccl(tmp_path):
    shared, split = smoke_config(tmp_path, tmp_path, 1, []), smoke_config(tmp_path, tmp_path, 2, [])
    assert (shared.rollout.weight_sync, split.rollout.weight_sync) == ("object_store", "auto")
    assert shared.rollout.engine == "vllm" and shared.deepspeed.bf16 is True and shared.run.iterations == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_refuses_in_one_line_without_a_gpu(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the GPU smoke benchmark needs a CUDA GPU") and err.count("\n") == 1
