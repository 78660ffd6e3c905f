"""The run folder's layout, as `RunDir` names it and as runs before it wrote it (pure: no Ray, no model)."""
import dataclasses
import json
import math
import pickle

import pytest

from sami.run_dir import MANIFEST, RunDir, verify_manifest


def test_every_path_of_the_layout(tmp_path):
    run = RunDir(tmp_path)
    named = {
        "iteration-3": run.iteration(3), "iteration-3/groups.parquet": run.groups(3), "iteration-3/hf": run.hf(3),
        "iteration-3/probe.json": run.probe(3), "iteration-3/COMPLETE": run.complete(3),
        "deepspeed": run.deepspeed_root, "deepspeed/iteration-3": run.deepspeed(3),
        "config.yaml": run.config, "config.iteration-2.yaml": run.kept_config(2), "principles.yaml": run.principles,
        "heldout_queries.jsonl": run.heldout_queries, "metrics.jsonl": run.metrics, "console.jsonl": run.console,
        "job.log": run.job_log, "error.log": run.error_log, "learner_starts": run.learner_starts,
        "STOPPED": run.stopped, "ray_train": run.ray_train,
    }
    assert {name: path.relative_to(tmp_path).as_posix() for name, path in named.items()} == {n: n for n in named}
    assert RunDir.tag(3) == "iteration-3"  # DeepSpeed's checkpoint tag: the folder name under deepspeed/
    assert RunDir(str(tmp_path)) == run and RunDir(str(tmp_path)).path == tmp_path  # a config's string works


def test_a_spec_crosses_to_the_workers_and_cannot_change(tmp_path):
    run = RunDir(tmp_path)
    assert pickle.loads(pickle.dumps(run)) == run
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.path = tmp_path / "other"


def test_only_a_complete_marker_counts_and_iterations_compare_as_numbers(tmp_path):
    run = RunDir(tmp_path)
    assert run.last_complete_iteration() == 0
    for k in (2, 9, 10):
        run.iteration(k).mkdir()
        run.complete(k).write_text("ok\n")
    run.iteration(11).mkdir()  # generated, never finished
    (run.iteration(11) / "groups.parquet").write_text("")
    assert run.last_complete_iteration() == 10


def test_mark_complete_writes_manifest_probe_metrics_row_then_marker(tmp_path):
    run = RunDir(tmp_path)
    run.deepspeed(1).mkdir(parents=True)
    (run.deepspeed(1) / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    run.iteration(1).mkdir()
    run.mark_complete(1, {"iteration": 1, "loss": math.nan, "loss_per_step": [0.5, math.inf]}, ([1, 2], [3]))
    run.hf(2).mkdir(parents=True)
    (run.hf(2) / "model.safetensors").write_bytes(b"exported")
    run.mark_complete(2, {"iteration": 2, "loss": 0.25}, ([4], [5, 6]))  # no DeepSpeed checkpoint kept
    verify_manifest(run.deepspeed(1))
    verify_manifest(run.hf(2))
    assert not (run.deepspeed(2) / MANIFEST).exists() and not (run.hf(1) / MANIFEST).exists()
    assert run.metrics.read_text().splitlines() == [  # non-finite floats become null: plain JSON
        '{"iteration": 1, "loss": null, "loss_per_step": [0.5, null]}', '{"iteration": 2, "loss": 0.25}']
    assert run.read_metrics() == [{"iteration": 1, "loss": None, "loss_per_step": [0.5, None]},
                                  {"iteration": 2, "loss": 0.25}]
    assert run.read_probe(1) == ([1, 2], [3]) and run.read_probe(2) == ([4], [5, 6])
    assert run.complete(2).read_text() == "ok\n" and run.last_complete_iteration() == 2


def test_no_metrics_yet_reads_as_no_rows(tmp_path):
    assert RunDir(tmp_path / "absent").read_metrics() == []


def test_what_a_resume_loads(tmp_path):
    run = RunDir(tmp_path)
    assert run.resume_source(1) is None
    run.hf(1).mkdir(parents=True)
    assert run.resume_source(1) is None  # an export folder without its config.json is no model
    (run.hf(1) / "config.json").write_text("{}")
    assert run.resume_source(1) == "hf"
    run.deepspeed(1).mkdir(parents=True)
    assert run.resume_source(1) == "deepspeed"  # weights and optimiser win over weights only


def test_a_stop_note_belongs_to_the_driver_that_wrote_it(tmp_path):
    run = RunDir(tmp_path)
    assert run.stop_message("a1") is None
    run.mark_stopped("a1", "iteration 2: loss is nan")
    assert json.loads(run.stopped.read_text()) == {"attempt": "a1", "message": "iteration 2: loss is nan"}
    assert run.stop_message("a1") == "iteration 2: loss is nan"
    assert run.stop_message("a2") is None  # an older driver's stop is not this run's


def test_learner_starts_are_counted_per_driver(tmp_path):
    run = RunDir(tmp_path / "new")
    run.record_learner_start("a1")  # makes the folder if it is missing
    run.record_learner_start("a2")
    run.record_learner_start("a2")
    assert (run.learner_start_count("a1"), run.learner_start_count("a2"), run.learner_start_count("a3")) == (1, 2, 0)
    assert run.learner_starts.read_text() == "a1\na2\na2\n"


def test_heldout_queries_are_one_json_object_a_line(tmp_path):
    run = RunDir(tmp_path)
    rows = [{"query_id": "q1", "query": "hi"}, {"query_id": "q2", "query": "ünïcode"}]
    run.write_heldout_queries(rows)
    assert [json.loads(line) for line in run.heldout_queries.read_text().splitlines()] == rows


def test_a_model_on_the_drivers_disk_is_shared_through_the_run_folder(tmp_path):
    """Learner and engine nodes share the run folder, not the driver's cache (tests/test_autoscaling.py's audit)."""
    cache = tmp_path / "cache" / "base-1"
    cache.mkdir(parents=True)
    (cache / "config.json").write_text('{"hidden_size": 8}')
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    assert run.share_model(str(cache)) == str(tmp_path / "run" / "base_model")
    assert (run.base_model / "config.json").read_text() == '{"hidden_size": 8}'
    assert run.share_model(str(cache)) == str(run.base_model)  # a resume copies it again over the old copy
