"""What a resume loads, on one real DeepSpeed learner (ZeRO-2, CPU, gloo, world size 1; no Ray): the DeepSpeed
checkpoint only when its manifest matches, else the HF export's weights with a fresh optimiser."""

import pytest
import torch

from planted import plant
from sami.config import load_config
from sami.run_dir import CheckpointError, RunDir, write_manifest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def learner(tiny_model_dir, *overrides):
    from sami.learner import Learner

    cfg = load_config(None, ["scaling.num_learners=1", "optim.groups_per_step=1", "deepspeed.zero_stage=2",
                             "objective.kl_beta=0", *overrides])
    return Learner(cfg, str(tiny_model_dir), 1, torch.device("cpu"), use_gpu=False)


def params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def perturb(one) -> None:
    with torch.no_grad():
        for p in one.module.parameters():
            p.add_(0.01)


def test_resume_from_the_hf_export_loads_its_weights_with_a_fresh_optimiser(process_group, tiny_model_dir, tmp_path):
    trained = learner(tiny_model_dir, "checkpoint.deepspeed=false")
    perturb(trained)  # stands in for an iteration of training: weights that differ from the base
    trained.save(RunDir(tmp_path), 1, rank=0)
    assert not (tmp_path / "deepspeed").exists()
    fresh = learner(tiny_model_dir, "checkpoint.deepspeed=false")
    assert fresh.restore(RunDir(tmp_path), 1) == "hf"
    expected, got = params(trained.module), params(fresh.module)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert fresh.engine.optimizer.state_dict()["base_optimizer_state"]["state"] == {}  # fresh: no Adam moments


def test_resume_from_deepspeed_checks_the_manifest_before_loading(process_group, tiny_model_dir, tmp_path):
    trained = learner(tiny_model_dir)
    perturb(trained)
    run_dir = RunDir(tmp_path)
    trained.save(run_dir, 1, rank=0)
    (tmp_path / "iteration-1").mkdir(exist_ok=True)
    run_dir.mark_complete(1, {"iteration": 1}, ([1], [2]))  # writes the manifest of what DeepSpeed saved
    fresh = learner(tiny_model_dir)
    assert fresh.restore(run_dir, 1) == "deepspeed"
    assert all(torch.equal(a, b) for a, b in zip(params(trained.module).values(), params(fresh.module).values()))
    states = next((tmp_path / "deepspeed" / "iteration-1").glob("*model_states.pt"))
    states.write_bytes(states.read_bytes() + b"\0")  # a file the run did not write
    with pytest.raises(CheckpointError, match="changed since the run wrote them"):
        learner(tiny_model_dir).restore(run_dir, 1)


def saved_run(tmp_path, tiny_model_dir, *overrides):
    """A run folder after iteration 1, as the learner and rank 0 leave it (the checkpoint's manifest written),
    and the learner that saved it (after one optimiser step: weights and optimiser state that differ from the base,
    under every ZeRO stage)."""
    from sami.groups import QueryGroup
    from sami.objectives import scoring_for

    trained = learner(tiny_model_dir, *overrides)
    group = QueryGroup("q", "x", prompt_ids=[[5, 6, 7], [5, 6, 8]], response_ids=[[8, 9, 10], [9, 10]])
    loss, _ = trained.engine([group], scoring_for(trained.cfg, 1))  # the learner's own loss step
    trained.engine.backward(loss)
    trained.engine.step()
    run_dir = RunDir(tmp_path)
    trained.save(run_dir, 1, rank=0)
    run_dir.mark_complete(1, {"iteration": 1}, ([1], [2]))
    return run_dir, trained


def test_a_planted_pickle_never_runs_even_with_a_rewritten_manifest(process_group, tiny_model_dir, tmp_path):
    from sami.learner import weights_only_loads

    (run_dir, _), marker = saved_run(tmp_path, tiny_model_dir), tmp_path / "planted-pickle-ran"
    plant(run_dir.deepspeed(1) / "mp_rank_00_model_states.pt", marker)
    write_manifest(run_dir.deepspeed(1))  # a plain sha256 manifest: whoever planted the file rewrites it
    fresh = learner(tiny_model_dir)
    with pytest.raises(CheckpointError, match=r"its pickle calls \['builtins.exec'\]"):
        fresh.restore(run_dir, 1)  # refused by the scan before DeepSpeed opens it
    # and the load itself, were the scan missed: DeepSpeed's own loader goes through the weights-only unpickler
    with pytest.raises(CheckpointError, match="refused by the weights-only loader"), weights_only_loads(fresh.engine):
        fresh.engine.load_checkpoint(str(run_dir.deepspeed_root), tag=run_dir.tag(1))
    assert not marker.exists()
    assert "load" not in vars(fresh.engine.checkpoint_engine)  # DeepSpeed's loader is back as it was


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_every_zero_stage_restores_weights_only(process_group, tiny_model_dir, tmp_path, zero_stage):
    """Each stage pickles its own optimiser state, all of it within the allow-list of the weights-only load."""
    stage = f"deepspeed.zero_stage={zero_stage}"
    run_dir, trained = saved_run(tmp_path, tiny_model_dir, stage)
    fresh, probe = learner(tiny_model_dir, stage), ([5, 6, 7], [8, 9, 10])
    base = fresh.probe_logprob(probe)
    assert fresh.restore(run_dir, 1) == "deepspeed"
    assert fresh.probe_logprob(probe) == pytest.approx(trained.probe_logprob(probe), abs=1e-6) != base
