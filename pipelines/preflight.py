"""What the training driver checks before Ray starts (and `--dry-run` checks too): the inputs a run reads, and
what `--resume` would continue from. Every problem is a ConfigError, one line naming the field or the file.

A bad principle file, a missing data file or a down principle-writer endpoint used to surface only inside the
actors, after Ray and the learners had started, as a long traceback.
"""
from __future__ import annotations

import random
from pathlib import Path

from sami.chat_clients import ChatClientError, check_endpoint
from sami.config import ConfigError, TrainConfig, config_differences, dump_config, load_config
from sami.constitutions import sample_constitutions
from sami.principle_writer import PrincipleWriterCore
from sami.principles import PrincipleError
from sami.run_dir import CheckpointError, RunDir, verify_checkpoint, verify_model_folder

# Extending (or shortening) a run is what --resume is for; any other change needs --override-config.
RESUMABLE_CHANGES = {"run.iterations"}
# File systems every node of a cluster can mount at once (/proc/mounts' type; fuse.* counts as its prefix, e.g.
# fuse.gcsfuse): EFS is nfs4.
SHARED_FILE_SYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs", "beegfs", "fuse"}


def check_inputs(cfg: TrainConfig, contact_endpoints: bool = True, generated_before: list[Path] = ()) -> None:
    """Principles, data files and replayed groups; with `contact_endpoints`, one cheap request to the writer's
    endpoint (not from --dry-run: presets name endpoints that only exist on the cluster). Groups replayed from
    a run in `generated_before` (trained earlier in the same job) do not exist yet."""
    run_dir = Path(cfg.run.output_dir)
    p = cfg.principles
    field = "principles.path" if p.source == "file" else "principles"
    try:
        library, _ = PrincipleWriterCore(p, run_dir).read_library()
        if library is None and contact_endpoints:
            check_endpoint(p.writer, field_prefix="principles.writer", purpose="principles.writer")
        if library is not None:  # the mode, k and held-out names must fit the library
            sample_constitutions(library, p.num_constitutions, p.mode, random.Random(0),
                                 k=p.principles_per_constitution, heldout=p.heldout_names,
                                 family=p.trained_members)
    except PrincipleError as e:
        raise ConfigError(f"{field}: {e}") from None
    except ChatClientError as e:
        raise ConfigError(str(e)) from None  # it names principles.writer and the URL
    except ValueError as e:
        raise ConfigError(f"principles: {e}") from None
    check_model_folder("model.name_or_path", cfg.model.name_or_path, "config.json")
    check_model_folder("model.tokenizer", cfg.model.tokenizer, "tokenizer_config.json")
    if cfg.model.lora.enabled:  # torch and transformers: only for a LoRA run
        from sami.lora import check_targets

        check_targets(cfg.model.name_or_path, cfg.model.lora, cfg.model.trust_remote_code)
    if cfg.data.source == "jsonl":
        from sami.data import load_queries

        load_queries(cfg.data, cfg.run.seed)  # the file exists and every line is JSON with a query
    if cfg.data.replay_groups_from and Path(cfg.data.replay_groups_from).resolve() not in generated_before:
        missing = [k for k in range(1, cfg.run.iterations + 1)
                   if not RunDir(cfg.data.replay_groups_from).groups(k).is_file()]
        if missing:
            raise ConfigError(f"data.replay_groups_from: {cfg.data.replay_groups_from} has no groups.parquet for "
                              f"iteration(s) {missing}")


def check_model_folder(field: str, name_or_path: str | None, marker: str) -> None:
    """A model (or tokenizer) given as a path, absolute once the driver resolved it, must be a folder that
    `save_pretrained` wrote (`marker` in it); a hub name or a built-in name is looked up where the model loads."""
    if name_or_path is None or not Path(name_or_path).is_absolute():
        return
    path = Path(name_or_path)
    if not path.exists():
        raise ConfigError(f"{field}: {path} does not exist (a model folder written by save_pretrained, or a hub name)")
    if not (path / marker).is_file():
        raise ConfigError(f"{field}: {path} is not a model folder (no {marker} in it)")


def run_folder(cfg: TrainConfig) -> RunDir:
    """`run.output_dir`, absolute; refused where it, or a folder above it, is a file."""
    path = Path(cfg.run.output_dir).resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"run.output_dir {path}: {existing} is a file, not a folder; choose another run.output_dir")
    return RunDir(path)


def check_run_dir(cfg: TrainConfig, resume: bool, override_config: bool) -> tuple[int, str]:
    """(last complete iteration, what a resume continues from, for the console). Refuses a folder that is a file,
    to start over a run, to resume an empty folder, changed settings without `override_config`, or a checkpoint
    it cannot load."""
    run_dir = run_folder(cfg)
    done = run_dir.last_complete_iteration()
    saved = run_dir.config
    if not resume:
        if saved.exists() or run_dir.metrics.exists():
            raise ConfigError(f"run.output_dir {run_dir.path} already holds a run (iteration {done} complete); pass --resume "
                              f"to continue it or choose another run.output_dir")
        return 0, "a new run"
    if not saved.is_file():
        raise ConfigError(f"--resume: {run_dir.path} holds no run (no config.yaml); start one without --resume")
    changed = config_differences(load_config(saved).with_absolute_paths(), cfg)  # a config.yaml of relative paths too
    if set(changed) - RESUMABLE_CHANGES and not override_config:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ConfigError(f"--resume: settings differ from {saved}: {listed}; pass --override-config to continue "
                          f"with the new ones, or --config {saved} to keep the old")
    if done == 0:
        return 0, "no complete iteration: starting again at iteration 1"
    source = run_dir.resume_source(done)
    try:
        if run_dir.hf(done).is_dir():  # a resume must not continue past an export no one can load
            verify_model_folder(run_dir.hf(done))
        if source == "deepspeed":
            verify_checkpoint(run_dir.deepspeed(done))
    except CheckpointError as e:
        raise ConfigError(f"--resume: iteration {done} is not whole: {e}; put back the run's own copy of it, or "
                          f"start a new run") from None
    if source == "deepspeed":
        return done, f"iteration {done} (DeepSpeed checkpoint: weights and optimiser, checksums verified)"
    if source == "hf" and cfg.deepspeed.zero_stage == 3:
        raise ConfigError(f"--resume: iteration {done} has no DeepSpeed checkpoint (checkpoint.deepspeed was false) "
                          f"and ZeRO-3 cannot load the HF export's weights; rerun with deepspeed.zero_stage<=2")
    if source == "hf":
        return done, (f"iteration {done} (weights from {run_dir.hf(done)}, a fresh optimiser: "
                      f"the run kept no DeepSpeed checkpoint)")
    raise ConfigError(f"--resume: iteration {done} kept neither a DeepSpeed checkpoint nor an HF export "
                      f"(checkpoint.deepspeed and checkpoint.export_hf were false): nothing to continue from")


def save_run_config(cfg: TrainConfig, run_dir: RunDir, done: int) -> None:
    """config.yaml, once every check passed; a resume with other settings keeps the old one beside it."""
    saved = run_dir.config
    if saved.is_file() and config_differences(load_config(saved), cfg):
        saved.rename(run_dir.kept_config(done))
    dump_config(cfg, saved)


def mount_of(path: Path, mounts: str) -> tuple[str, str]:
    """(mount point, file system type) of the mount holding `path`'s nearest existing folder, from the text of
    /proc/mounts."""
    here = next(p for p in (path, *path.parents) if p.exists()).resolve()
    best = ("/", "unknown")
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (here == Path(point) or Path(point) in here.parents) and len(point) >= len(best[0]):
            best = (point, fields[2])
    return best


def check_shared_run_folder(run_dir: Path, machines: set[str], mounts_file: Path = Path("/proc/mounts")) -> None:
    """Refuse a run folder on a node's own disk when the driver and the learners are on several machines: the
    learners write their checkpoint shards, metrics.jsonl, console.jsonl and STOPPED there, the driver and every
    learner read them back (a resume, a restarted learner group). One machine (or no /proc/mounts to read): no check."""
    if len(machines) < 2 or not mounts_file.is_file():
        return
    point, fstype = mount_of(run_dir, mounts_file.read_text())
    if fstype.split(".")[0] in SHARED_FILE_SYSTEMS:
        return
    raise ConfigError(f"run.output_dir {run_dir} is on this node's own disk ({fstype} at {point}), but the driver and "
                      f"the learners are on {len(machines)} machines ({', '.join(sorted(machines))}), which must all "
                      f"read and write it: mount a shared file system there on every node (docs/cluster.md, "
                      f"\"Storage\"), or choose a run.output_dir on one")
