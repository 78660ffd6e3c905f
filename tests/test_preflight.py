"""Bad input is refused before Ray starts, and `--resume` overwrites nothing: each case through the entry points'
`main`, in-process, with a fresh RAY_TMPDIR that must stay empty and `ray.is_initialized()` False after it."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
import yaml
from safetensors.torch import save_file

from evals.run import main as eval_main
from pipelines.preflight import check_run_dir, save_run_config
from pipelines.train import main as train_main
from pipelines.train import root_cause
from planted import plant
from sami.config import ConfigError, dump_config, load_config
from sami.run_dir import MANIFEST, RunDir, write_manifest

GOOD = [{"name": f"p{i}", "definition": f"Do thing {i}.", "antithesis": f"Never do thing {i}."} for i in range(4)]


@pytest.fixture
def no_ray(tmp_path, monkeypatch):
    """Asserts, after the test, that no Ray process was started: no session directory, no Ray in-process."""
    ray_tmp = tmp_path / "ray-tmp"
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    yield
    assert not ray.is_initialized()
    assert not ray_tmp.exists() or not any(ray_tmp.iterdir())


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def train(tmp_path, *args) -> int:
    return train_main(["--config", "configs/tiny.yaml", f"run.output_dir={tmp_path / 'run'}", *args])


@pytest.mark.parametrize("entries, message", [
    ([{**GOOD[0], "antithesis": None}, *GOOD[1:]], "principle #1 ('p0'): missing 'antithesis'"),
    ([*GOOD, GOOD[1]], "principle #5 ('p1'): duplicate name 'p1'"),
    ([{**GOOD[0], "definition": "  "}, *GOOD[1:]], "'definition' must be non-empty text"),
    ("principles: [name: x\n", "cannot parse"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_malformed_principle_file_is_one_line_before_ray(tmp_path, capsys, no_ray, entries, message, dry_run):
    path = tmp_path / "principles.yaml"
    path.write_text(entries if isinstance(entries, str) else yaml.safe_dump(entries))
    code = train(tmp_path, "principles.source=file", f"principles.path={path}", *(["--dry-run"] if dry_run else []))
    err = one_error_line(capsys)
    assert code == 2 and err.startswith(f"error: principles.path: {path}") and message in err
    assert not (tmp_path / "run").exists()  # nothing written either


def test_the_cli_refuses_before_it_imports_ray(tmp_path):
    """In a fresh interpreter: the answer comes before Ray (or torch) is even imported, so in well under a second."""
    path = tmp_path / "principles.yaml"
    path.write_text(yaml.safe_dump([GOOD[0], GOOD[0]]))
    code = ("import sys; from pipelines.train import main; "
            f"code = main(['--config', 'configs/tiny.yaml', 'run.output_dir={tmp_path}/run', 'principles.source=file', "
            f"'principles.path={path}']); print(code, 'ray' in sys.modules, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False", "False"], done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("principle #2 ('p0'): duplicate name 'p0'")


def test_a_library_too_small_for_the_mode_is_refused(tmp_path, capsys, no_ray):
    path = tmp_path / "principles.yaml"
    path.write_text(yaml.safe_dump(GOOD[:2]))  # tiny.yaml samples k=3 principles per constitution
    assert train(tmp_path, "principles.source=file", f"principles.path={path}", "--dry-run") == 2
    assert "needs 1 <= k <= 2 training principles, got k=3" in one_error_line(capsys)


@pytest.mark.parametrize("dry_run", [True, False])
def test_missing_or_broken_data_files_are_one_line_before_ray(tmp_path, capsys, no_ray, dry_run):
    flag = ["--dry-run"] if dry_run else []
    assert train(tmp_path, "data.source=jsonl", "data.task=dialogue", f"data.path={tmp_path}/none.jsonl", *flag) == 2
    assert f"data.path: file not found: {tmp_path}/none.jsonl" in one_error_line(capsys)
    broken = tmp_path / "queries.jsonl"
    broken.write_text('{"query": "hello"}\nnot json\n')
    assert train(tmp_path, "data.source=jsonl", "data.task=dialogue", f"data.path={broken}", *flag) == 2
    assert f"{broken} line 2: not valid JSON" in one_error_line(capsys)
    assert train(tmp_path, f"data.replay_groups_from={tmp_path}/other-run", *flag) == 2
    assert "has no groups.parquet for iteration(s) [1, 2]" in one_error_line(capsys)


def test_a_down_principle_writer_is_one_line_before_ray(tmp_path, capsys, no_ray):
    assert train(tmp_path, "principles.source=writer", "principles.writer.model=m", "principles.mode=antithesis_all",
                 "principles.writer.base_url=http://127.0.0.1:9/v1", "principles.writer.retries=0") == 2
    err = one_error_line(capsys)
    assert err.startswith("error: principles.writer: http://127.0.0.1:9/v1/chat/completions failed after 1 attempt(s)")


def test_a_down_judge_stops_the_evaluation_before_it_generates(tmp_path, capsys, no_ray):
    code = eval_main(["--config", "configs/eval_world.yaml", f"run.output_dir={tmp_path / 'eval'}",
                      "models=[{name: base, path: 'builtin:world'}, {name: other, path: 'builtin:world'}]",
                      "judge.backend=openai", "judge.model=judge", "judge.base_url=http://127.0.0.1:9/v1",
                      "judge.retries=0"])
    err = one_error_line(capsys)
    assert code == 2 and "judge: http://127.0.0.1:9/v1/chat/completions failed" in err and "cannot reach" in err
    assert not (tmp_path / "eval").exists()


def test_evaluation_dry_run_refuses_a_malformed_principle_file(tmp_path, capsys, no_ray):
    path = tmp_path / "principles.yaml"
    path.write_text(yaml.safe_dump([GOOD[0], GOOD[0]]))
    code = eval_main(["--config", "configs/eval_world.yaml", "--dry-run", "judge.backend=openai", "judge.model=j",
                      "judge.base_url=http://127.0.0.1:9/v1", "data.source=jsonl", "data.task=dialogue",
                      f"data.path={path}", "principles.source=file", f"principles.path={path}", "adherence.enabled=false",
                      "adherence.heldout_principle_queries=0"])
    assert code == 2 and "duplicate name 'p0'" in capsys.readouterr().err


# --- --resume ------------------------------------------------------------------------------------------------

def fake_run(tmp_path, *overrides, deepspeed=True, hf=False):
    """A run directory as training leaves it after iteration 1 (checkpoint files are small stand-ins in the
    formats the run writes: a torch.save archive of tensors, a safetensors file)."""
    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path / 'run'}", *overrides])
    run_dir = tmp_path / "run"
    dump_config(cfg, run_dir / "config.yaml")
    (run_dir / "iteration-1").mkdir()
    (run_dir / "iteration-1" / "COMPLETE").write_text("ok\n")
    if deepspeed:
        ckpt = run_dir / "deepspeed" / "iteration-1"
        ckpt.mkdir(parents=True)
        torch.save({"module": {"w": torch.zeros(4)}, "ds_version": "0.19.8"}, ckpt / "mp_rank_00_model_states.pt")
        write_manifest(ckpt)
    if hf:
        hf_dir = run_dir / "iteration-1" / "hf"
        hf_dir.mkdir()
        (hf_dir / "config.json").write_text("{}")
        save_file({"w": torch.zeros(256)}, hf_dir / "model.safetensors")
        write_manifest(hf_dir)
    return run_dir


def test_resume_refuses_an_empty_folder(tmp_path, capsys, no_ray):
    (tmp_path / "run").mkdir()
    assert train(tmp_path, "--resume") == 2
    assert f"--resume: {tmp_path / 'run'} holds no run (no config.yaml)" in one_error_line(capsys)


def test_resume_refuses_changed_settings_and_leaves_config_yaml(tmp_path, capsys, no_ray):
    run_dir = fake_run(tmp_path)
    before = (run_dir / "config.yaml").read_bytes()
    assert train(tmp_path, "--resume", "optim.lr=1e-3", "sampling.batch_size=32") == 2
    err = one_error_line(capsys)
    assert "optim.lr: 0.0003 -> 0.001; sampling.batch_size: 64 -> 32; pass --override-config" in err
    assert (run_dir / "config.yaml").read_bytes() == before
    # a fresh run over it is refused too
    assert train(tmp_path) == 2 and "already holds a run (iteration 1 complete)" in one_error_line(capsys)


def test_override_config_keeps_the_old_config_beside_the_new(tmp_path):
    run_dir = fake_run(tmp_path)
    before = (run_dir / "config.yaml").read_text()
    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={run_dir}", "optim.lr=1e-3"])
    assert check_run_dir(cfg, resume=True, override_config=True)[0] == 1
    save_run_config(cfg, RunDir(run_dir), 1)
    assert (run_dir / "config.iteration-1.yaml").read_text() == before
    assert load_config(run_dir / "config.yaml").optim.lr == 1e-3
    # run.iterations may change without --override-config: extending a run is what --resume is for
    longer = load_config("configs/tiny.yaml", [f"run.output_dir={run_dir}", "optim.lr=1e-3", "run.iterations=3"])
    assert check_run_dir(longer, resume=True, override_config=False)[0] == 1


def test_resume_refuses_a_checkpoint_the_run_did_not_write(tmp_path, capsys, no_ray):
    run_dir = fake_run(tmp_path)
    ckpt = run_dir / "deepspeed" / "iteration-1"
    assert train(tmp_path, "--resume", "--dry-run") == 0
    assert "would continue from iteration 1 (DeepSpeed checkpoint: weights and optimiser, checksums verified)" \
        in capsys.readouterr().out
    states = (ckpt / "mp_rank_00_model_states.pt").read_bytes()
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"evil" * 100)
    assert train(tmp_path, "--resume") == 2
    assert "['mp_rank_00_model_states.pt'] changed since the run wrote them" in one_error_line(capsys)
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(states)
    (ckpt / "extra.pt").write_bytes(b"planted")
    assert train(tmp_path, "--resume") == 2
    assert "not in it: ['extra.pt']" in one_error_line(capsys)
    (ckpt / MANIFEST).unlink()
    (ckpt / "extra.pt").unlink()
    assert train(tmp_path, "--resume") == 2
    assert f"no {MANIFEST}" in one_error_line(capsys)


def test_resume_refuses_a_planted_pickle_whose_manifest_was_rewritten(tmp_path, capsys, no_ray):
    run_dir = fake_run(tmp_path)
    ckpt, marker = run_dir / "deepspeed" / "iteration-1", tmp_path / "planted-pickle-ran"
    plant(ckpt / "mp_rank_00_model_states.pt", marker)
    write_manifest(ckpt)  # whoever can write the folder can rewrite a plain sha256 manifest too
    assert train(tmp_path, "--resume", "--dry-run") == 2
    assert "mp_rank_00_model_states.pt: its pickle calls ['builtins.exec'], which no DeepSpeed checkpoint holds" \
        in one_error_line(capsys)
    assert train(tmp_path, "--resume") == 2
    assert one_error_line(capsys).startswith("error: --resume: iteration 1 is not whole: ")
    assert not marker.exists()


def test_resume_refuses_a_truncated_hf_export(tmp_path, capsys, no_ray):
    run_dir = fake_run(tmp_path, hf=True)
    weights = run_dir / "iteration-1" / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a disk that filled up, a copy cut short
    assert train(tmp_path, "--resume", "--dry-run") == 2
    assert "['model.safetensors'] changed since the run wrote them" in one_error_line(capsys)
    assert train(tmp_path, "--resume") == 2
    assert one_error_line(capsys).startswith("error: --resume: iteration 1 is not whole: ")
    (run_dir / "iteration-1" / "hf" / MANIFEST).unlink()  # an export without a manifest (an older run's)
    assert train(tmp_path, "--resume") == 2
    assert "model.safetensors: not a whole safetensors file" in one_error_line(capsys)


def test_resume_without_a_deepspeed_checkpoint(tmp_path, capsys, no_ray):
    run_dir = fake_run(tmp_path, "checkpoint.deepspeed=false", deepspeed=False, hf=True)
    assert train(tmp_path, "checkpoint.deepspeed=false", "--resume", "--dry-run") == 0
    assert (f"would continue from iteration 1 (weights from {run_dir}/iteration-1/hf, a fresh optimiser"
            in capsys.readouterr().out)
    assert train(tmp_path, "checkpoint.deepspeed=false", "deepspeed.zero_stage=3", "--resume", "--override-config") == 2
    assert "ZeRO-3 cannot load the HF export's weights" in one_error_line(capsys)
    shutil.rmtree(run_dir / "iteration-1" / "hf")
    assert train(tmp_path, "checkpoint.deepspeed=false", "--resume") == 2
    assert "kept neither a DeepSpeed checkpoint nor an HF export" in one_error_line(capsys)


def test_override_config_needs_resume(tmp_path, capsys):
    assert train(tmp_path, "--override-config") == 2
    assert "--override-config only applies with --resume" in one_error_line(capsys)


def test_root_cause_sees_through_ray_trains_wrappers():
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    inner = RuntimeError("iteration 1: only 0 query groups survived filtering")
    wrapped = WorkerGroupError("rank 0 failed", {1: ValueError("later rank"), 0: inner})
    assert root_cause(ControllerError(wrapped)) is inner
    task = RayTaskError("f", "traceback text", KeyError("x"))
    try:
        raise RuntimeError("outer") from task
    except RuntimeError as e:
        assert isinstance(root_cause(e), KeyError)
    plain = ValueError("plain")
    assert root_cause(plain) is plain


def bad_input(tmp_path, case: str) -> tuple[list[str], str]:
    """(overrides, the start of the one error line) for an input today's driver checks too late or not at all."""
    if case == "model path missing":
        return [f"model.name_or_path={tmp_path}/no-model"], f"error: model.name_or_path: {tmp_path}/no-model does not exist"
    if case == "model path not a model folder":
        (tmp_path / "empty").mkdir()
        return [f"model.name_or_path={tmp_path}/empty"], \
            f"error: model.name_or_path: {tmp_path}/empty is not a model folder (no config.json in it)"
    if case == "output_dir a file":
        (tmp_path / "a-file").write_text("x")
        return [f"run.output_dir={tmp_path}/a-file"], \
            f"error: run.output_dir {tmp_path}/a-file: {tmp_path}/a-file is a file, not a folder"
    if case == "jsonl not utf-8":
        (tmp_path / "q.jsonl").write_bytes(b'{"query": "fine"}\n{"query": "caf\xe9"}\n')
        return ["data.source=jsonl", "data.task=dialogue", f"data.path={tmp_path}/q.jsonl"], \
            f"error: data.path {tmp_path}/q.jsonl line 2: not UTF-8"
    if case == "principle lone surrogate":
        text = yaml.safe_dump(GOOD).replace("definition: Do thing 0.", 'definition: "Do \\ud800 thing 0."')
        (tmp_path / "p.yaml").write_text(text)
        return ["principles.source=file", f"principles.path={tmp_path}/p.yaml"], \
            f"error: principles.path: {tmp_path}/p.yaml: principle #1 ('p0'): 'definition' holds a lone surrogate"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["model path missing", "model path not a model folder", "output_dir a file",
                                  "jsonl not utf-8", "principle lone surrogate"])
@pytest.mark.parametrize("dry_run", [True, False])
def test_inputs_checked_too_late_are_one_line_before_ray(tmp_path, capsys, no_ray, case, dry_run):
    overrides, line = bad_input(tmp_path, case)
    code = train_main(["--config", "configs/tiny.yaml", f"run.output_dir={tmp_path / 'run'}", *overrides,
                       *(["--dry-run"] if dry_run else [])])
    err = one_error_line(capsys)
    assert code == 2 and err.startswith(line), err
    assert "--resume" not in err  # nothing ran, so nothing to continue


def test_relative_paths_are_made_absolute_against_the_drivers_folder(tmp_path, monkeypatch):
    """Ray Train moves each learner into a session folder: a relative path must not reach a worker."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["principles.source=file", "principles.path=p.yaml", "run.output_dir=runs/x",
                             "data.source=jsonl", "data.path=q.jsonl", "data.replay_groups_from=runs/other",
                             "model.name_or_path=./model", "model.tokenizer=org/hub-name"]).with_absolute_paths()
    assert (cfg.principles.path, cfg.run.output_dir, cfg.data.path, cfg.data.replay_groups_from, cfg.model.name_or_path) \
        == tuple(str(tmp_path / p) for p in ("p.yaml", "runs/x", "q.jsonl", "runs/other", "model"))
    assert cfg.model.tokenizer == "org/hub-name"  # a hub name with no such local folder stays a name


def test_evaluation_refuses_a_truncated_hf_export_in_its_dry_run_and_before_loading(tmp_path, capsys, no_ray):
    hf = fake_run(tmp_path, hf=True) / "iteration-1" / "hf"
    weights = hf / "model.safetensors"
    evaluate = ["--config", "configs/eval_world.yaml", f"run.output_dir={tmp_path / 'eval'}",
                f"models=[{{name: base, path: 'builtin:world'}}, {{name: sami-iter1, path: '{hf}'}}]"]
    weights.write_bytes(weights.read_bytes()[:-100])
    for dry_run in (["--dry-run"], []):
        assert eval_main(evaluate + dry_run) == 2
        assert one_error_line(capsys) == (f"error: models.1.path: {hf}: ['model.safetensors'] changed since the run "
                                          f"wrote them (sha256 differs from {MANIFEST})")
    (hf / MANIFEST).unlink()  # an export without a manifest: its safetensors header still tells it is cut short
    assert eval_main(evaluate + ["--dry-run"]) == 2
    assert "error: models.1.path: " in one_error_line(capsys)
    assert not (tmp_path / "eval").exists()



MOUNTS = """/dev/root / ext4 rw,relatime 0 0
fs-0123.efs.us-west-2.amazonaws.com:/ /mnt/efs nfs4 rw,vers=4.1 0 0
"""


def test_a_node_local_run_folder_is_refused_only_across_machines(tmp_path):
    """The driver on one machine, the learners on another: the run folder must be on a shared file system (a
    /proc/mounts of our own: this machine's disk, an EFS mount, a bucket through FUSE)."""
    from pipelines.preflight import check_shared_run_folder, mount_of

    def mounts(text: str) -> Path:
        (tmp_path / "mounts").write_text(text)
        return tmp_path / "mounts"

    run, two = tmp_path / "runs" / "x", {"10.0.0.1", "10.0.0.2"}
    assert mount_of(run, MOUNTS) == ("/", "ext4")  # the nearest existing folder's mount
    with pytest.raises(ConfigError) as refused:
        check_shared_run_folder(run, two, mounts(MOUNTS))
    assert str(refused.value) == (f"run.output_dir {run} is on this node's own disk (ext4 at /), but the driver and "
                                  "the learners are on 2 machines (10.0.0.1, 10.0.0.2), which must all read and write "
                                  "it: mount a shared file system there on every node (docs/cluster.md, \"Storage\"), "
                                  "or choose a run.output_dir on one")
    check_shared_run_folder(run, {"10.0.0.1"}, mounts(MOUNTS))  # one machine: its disk is everyone's
    check_shared_run_folder(run, two, mounts(MOUNTS + f"efs:/ {tmp_path} nfs4 rw 0 0\n"))
    check_shared_run_folder(run, two, mounts(MOUNTS + f"bucket {tmp_path} fuse.gcsfuse rw 0 0\n"))


# --- what --dry-run checks offline, and says it could not ---------------------------------------------------------

def dry_run(capsys, *args) -> tuple[int, str, str]:
    code = train_main([*args, "--dry-run"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_config_mistakes_are_one_line_that_says_what_to_do(tmp_path, capsys, no_ray):
    cases = [
        (train_main, ["--config", "configs/eval_world.yaml", "--dry-run"],
         "error: configs/eval_world.yaml is an evaluation config (it has adherence, baseline, generation, judge, ...), "
         "not a training config: run it with python -m evals.run --config configs/eval_world.yaml"),
        (eval_main, ["--config", "configs/tiny.yaml", "--dry-run"],
         "error: configs/tiny.yaml is a training config (it has deepspeed, model, objective, optim, ...), not an "
         "evaluation config: train with python -m pipelines.train --config configs/tiny.yaml, then evaluate the run "
         "with python -m evals.run --run <its run.output_dir>"),
        (train_main, ["--config", "configs", "--dry-run"],
         "error: --config configs is a directory, not a config file: give a YAML file such as configs/tiny.yaml"),
        (train_main, ["--config", "configs/tiny.yaml", "optim.lrr=1e-4", "--dry-run"],
         "error: invalid config (configs/tiny.yaml): optim.lrr: unknown field; did you mean optim.lr?"),
        (train_main, ["--config", "configs/tiny.yaml", "optimm.lr=1e-4", "--dry-run"],
         "error: invalid config (configs/tiny.yaml): optimm: unknown field; did you mean optim?"),
        (eval_main, ["--config", "configs/eval_world.yaml", "models.0.pth=x", "--dry-run"],
         "error: invalid config (configs/eval_world.yaml): models.0.pth: unknown field; did you mean models.0.path?"),
    ]
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing but a comment\n")
    cases.append((train_main, ["--config", str(empty), "--dry-run"],
                  f"error: config file {empty} is empty (or only comments): give at least one section "
                  f"(configs/tiny.yaml is a small example), or leave out --config to run on the built-in world"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run: {iterations: 1}\n")
    cases.append((eval_main, ["--config", str(run), "--dry-run"],
                  f"error: --config {run} is a directory, not a config file (a run folder: give its config.yaml): "
                  f"give a YAML file such as configs/tiny.yaml"))
    for main, argv, line in cases:
        assert main(argv) == 2, argv
        assert one_error_line(capsys) == line


def test_an_unknown_field_with_nothing_near_lists_the_fields_there():
    with pytest.raises(ConfigError, match=r"run.zzz: unknown field \(the fields of run: name, output_dir, seed, "
                                          r"iterations\)$"):
        load_config(None, ["run.zzz=1"])


def test_the_training_config_knows_the_evaluation_configs_sections():
    from evals.config import EvalConfig
    from sami.config import EVALUATION_SECTIONS, TrainConfig

    assert set(EVALUATION_SECTIONS) == set(EvalConfig.model_fields) - set(TrainConfig.model_fields)


@pytest.mark.parametrize("overrides, line", [
    (["data.heldout_queries=100000", "data.max_queries=10"],
     "error: data: iteration 1 samples 64 queries (4 steps x optim.groups_per_step 16), but there are 10 to train on "
     "(10 after data.heldout_queries 100000); add rows (or raise data.max_queries), or set "
     "data.queries_per_iteration=10 or lower"),
    (["data.max_queries=100", "data.queries_per_iteration=60", "schedule.alternate_splits=true"],
     "error: data: iteration 1 samples 60 queries (data.queries_per_iteration), but there are 50 to train on (100 "
     "after data.heldout_queries 32, half of them per iteration under schedule.alternate_splits); add rows (or raise "
     "data.max_queries), or set data.queries_per_iteration=50 or lower"),
])
def test_counts_are_checked_against_the_data(tmp_path, capsys, no_ray, overrides, line):
    code, out, err = dry_run(capsys, "--config", "configs/tiny.yaml", f"run.output_dir={tmp_path / 'run'}", *overrides)
    assert (code, out, err) == (2, "", line + "\n")


def test_a_small_jsonl_file_is_checked_against_what_an_iteration_samples(tmp_path, capsys, no_ray):
    path = tmp_path / "queries.jsonl"
    path.write_text("".join(f'{{"query": "question {i}?"}}\n' for i in range(3)))
    data = ["data.source=jsonl", "data.task=dialogue", f"data.path={path}", "data.max_queries=null"]
    assert train(tmp_path, *data, "data.heldout_queries=3", "--dry-run") == 2
    assert one_error_line(capsys) == ("error: data.heldout_queries (3) leaves no training queries: the data yields 3 "
                                      "(data.max_queries plus the held-out ones at most); hold out fewer or add rows")
    assert train(tmp_path, *data, "data.heldout_queries=0", "--dry-run") == 2  # 4 steps x 16 groups: 64 queries
    assert one_error_line(capsys).startswith("error: data: iteration 1 samples 64 queries (4 steps x "
                                             "optim.groups_per_step 16), but there are 3 to train on")
    assert train(tmp_path, *data, "data.heldout_queries=0", "data.queries_per_iteration=3", "--dry-run") == 0
    assert capsys.readouterr().out.splitlines()[-1] == "inputs OK"


@pytest.mark.parametrize("overrides, line", [
    (["rollout.tensor_parallel_size=16"],
     "error: rollout.tensor_parallel_size: one vllm engine asks for 16 GPU(s) and 16 CPU(s) on one node, more than the "
     "largest rollout node type of ray_cluster.yaml has (rollout: 4 GPUs, 48 CPUs); lower "
     "rollout.tensor_parallel_size to fit it, or add a node type that big to ray_cluster.yaml"),
    (["scaling.num_learners=32"],
     "error: scaling.num_learners: 32 learners ask for {'CPU': 8.0, 'GPU': 1.0} each, more than the learner node types "
     "of ray_cluster.yaml can start together (max_workers x GPUs: 16 GPUs); lower scaling.num_learners or raise "
     "max_workers there"),
    (["scaling.gpus_per_learner=9"],
     "error: scaling.gpus_per_learner: one learner asks for {'CPU': 8.0, 'GPU': 9.0}, more than any learner node type "
     "of ray_cluster.yaml has (learner: 8 GPUs, 96 CPUs); lower scaling.gpus_per_learner / cpus_per_learner or add a "
     "node type that big"),
])
def test_a_placement_no_node_type_can_give_is_refused(capsys, no_ray, overrides, line):
    """ray_cluster.yaml: learner nodes of 8 GPUs (2 at most), rollout nodes of 4: the run would wait
    scaling.placement_timeout_s (1800 s) for nothing."""
    assert dry_run(capsys, "--config", "configs/hh_mistral7b.yaml", *overrides) == (2, "", line + "\n")


def test_what_needs_the_hub_is_said_instead_of_inputs_ok(tmp_path, capsys, no_ray, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    code, out, _ = dry_run(capsys, "--config", "configs/hh_mistral7b.yaml", "model.name_or_path=my-org/not-a-real-model",
                           "data.dataset=my-org/not-a-dataset")
    tail = out.splitlines()[-3:]
    assert code == 0 and "inputs OK" not in out
    assert tail[0] == ("not checked: model.name_or_path 'my-org/not-a-real-model' needs the hub (not in the local "
                       "cache): that it exists, and its size")
    assert tail[1].startswith("not checked: data.dataset 'my-org/not-a-dataset' needs the hub (not in the local cache)")
    assert tail[2] == "the inputs checked here are fine, 2 not checked (above)"
    for kind, name in (("models", "my-org--not-a-real-model"), ("datasets", "my-org--not-a-dataset")):
        (tmp_path / "hub" / f"{kind}--{name}" / "snapshots" / "abc").mkdir(parents=True)
    out = dry_run(capsys, "--config", "configs/hh_mistral7b.yaml", "model.name_or_path=my-org/not-a-real-model",
                  "data.dataset=my-org/not-a-dataset")[1]
    assert "model.name_or_path" not in out.split("checkpoints in")[-1]  # cached: checked
    assert "data.dataset 'my-org/not-a-dataset' is in the local cache, but its rows are counted only when the run " \
           "loads it" in out


# The weak-writer preset with a 7B student: its Mixtral student needs more than an 80 GB GPU with today's learner
# (tests/test_memory_plan.py), which the plan refuses before it asks the writer.
WRITER_PRESET = ("--config", "configs/tldr_mixtral_weak_writer.yaml", "model.name_or_path=mistralai/Mistral-7B-v0.1")


def test_a_writer_endpoint_that_does_not_answer_is_said(capsys, no_ray):
    code, out, _ = dry_run(capsys, *WRITER_PRESET, "principles.writer.base_url=http://127.0.0.1:9/v1")
    assert code == 0 and "inputs OK" not in out
    assert ("not checked: principles.writer.base_url http://127.0.0.1:9/v1 does not answer from here; the run needs it "
            "up before it starts") in out


def test_a_writer_endpoint_that_answers_is_said_and_the_plan_names_it(capsys, no_ray):
    from chat_server import ChatServer

    server = ChatServer("OK")
    try:
        code, out, _ = dry_run(capsys, *WRITER_PRESET, f"principles.writer.base_url={server.url}")
    finally:
        server.close()
    assert code == 0 and len(server.requests) == 1
    assert (f"  principle writer: 1 x (0 GPU, 0.1 CPU), principles from writer (openai) at {server.url}, model "
            f"mistralai/Mistral-7B-Instruct-v0.2 (served outside this job: its GPUs are the server's)") in out
    assert f"principles.writer.base_url {server.url} answers\n" in out and "not checked: principles.writer" not in out


def test_the_plan_names_each_roles_node_type_gpus_and_nodes(capsys, no_ray):
    """ray_cluster.yaml: learner nodes p4de.24xlarge (8 x A100 80 GB, 2 at most), rollout nodes g6e.12xlarge (4 x L40S
    48 GB, 4 at most). 16 one-GPU learners take both learner nodes; one TP-4 engine fills one rollout node, five
    one-GPU engines take two."""
    out = dry_run(capsys, "--config", "configs/tldr_mixtral_weak_writer.yaml")[1].splitlines()
    assert "  learners: 2 learner node(s) of 2 at most (p4de.24xlarge: 8 x A100 80 GB, 96 CPUs each)" in out
    assert "  rollout engines: 1 rollout node(s) of 4 at most (g6e.12xlarge: 4 x L40S 48 GB, 48 CPUs each)" in out
    out = dry_run(capsys, "--config", "configs/hh_mistral7b.yaml", "rollout.num_engines=5")[1].splitlines()
    assert "  learners: 1 learner node(s) of 2 at most (p4de.24xlarge: 8 x A100 80 GB, 96 CPUs each)" in out
    assert "  rollout engines: 2 rollout node(s) of 4 at most (g6e.12xlarge: 4 x L40S 48 GB, 48 CPUs each)" in out


def test_the_evaluation_plan_counts_the_judges_requests_and_says_whether_its_key_is_set(capsys, monkeypatch, no_ray):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert eval_main(["--config", "configs/eval_hh_mistral7b.yaml", "--dry-run", "judge.base_url=http://127.0.0.1:9/v1"]) == 0
    out = capsys.readouterr().out
    assert ("  judge: openai gpt-4-0613 at http://127.0.0.1:9/v1; 1000 requests (win rates 4 model(s) x 250 queries x 1);"
            " key $OPENAI_API_KEY is not set here (set it where the job runs)") in out.splitlines()
    assert out.splitlines()[-1].startswith("config OK, ") and "warning(s) above" in out.splitlines()[-1]
    monkeypatch.setenv("OPENAI_API_KEY", "not-a-real-key")
    assert eval_main(["--config", "configs/eval_mtbench_multitask.yaml", "--dry-run", "judge.swap=true",
                      "judge.base_url=http://127.0.0.1:9/v1"]) == 0
    out = capsys.readouterr().out
    # win rates 2 models x 250 queries x 2 orders (1000); MT-Bench 3 models x 80 questions x 2 turns (480) + 2 x 80 x 2 (320)
    assert "; 1800 requests (win rates 2 model(s) x 250 queries x 2; MT-Bench 3 model(s) x 80 questions x 2 turns + " \
           "2 x 80 pairwise x 2 orders); key $OPENAI_API_KEY is set here" in out
    assert "not-a-real-key" not in out


def test_submitting_a_placement_no_node_type_can_give_is_refused_before_anything_is_sent(capsys, no_ray):
    from cluster.submit import main as submit_main

    assert submit_main(["--config", "configs/hh_mistral7b.yaml", "rollout.tensor_parallel_size=16", "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith("error: rollout.tensor_parallel_size: one vllm engine asks for 16 GPU(s)")
