"""What the training driver checks before Ray starts (and `--dry-run` checks too): the inputs a run reads, and
what `--resume` would continue from. Every problem is a ConfigError, one line naming the field or the file.

A bad principle file, a missing data file or a down principle-writer endpoint used to surface only inside the
actors, after Ray and the learners had started, as a long traceback.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from actors.node_types import LEARNER, ROLLOUT, NodeType, fits, node_types, role_types
from pipelines.plan import learner_bundle, resource_plan
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
    check_chat_template(cfg)
    if cfg.model.lora.enabled:  # torch and transformers: only for a LoRA run
        from sami.lora import check_targets

        check_targets(cfg.model.name_or_path, cfg.model.lora, cfg.model.trust_remote_code)
    rows = None  # the queries the data yields, where that is known without the hub
    if cfg.data.source == "jsonl" or (cfg.data.source == "hf" and not hub_name(cfg.data.dataset)):
        from sami.data import load_queries

        # a JSONL file, or a data set in a local folder: it loads, and every record has a non-empty query
        rows = len(load_queries(cfg.data, cfg.run.seed))
    elif cfg.data.source == "world":
        from sami.data import WORLD_QUERIES

        rows = (cfg.data.max_queries or WORLD_QUERIES) + cfg.data.heldout_queries
    check_query_counts(cfg, rows)
    if cfg.data.replay_groups_from and Path(cfg.data.replay_groups_from).resolve() not in generated_before:
        missing = [k for k in range(1, cfg.run.iterations + 1)
                   if not RunDir(cfg.data.replay_groups_from).groups(k).is_file()]
        if missing:
            raise ConfigError(f"data.replay_groups_from: {cfg.data.replay_groups_from} has no groups.parquet for "
                              f"iteration(s) {missing}")


def check_query_counts(cfg: TrainConfig, rows: int | None) -> None:
    """The queries held out and those an iteration samples against the rows the data yields (`rows`; None for a hub
    data set, bounded by data.max_queries alone): an iteration given fewer rows than it samples trains on fewer
    groups than its steps ask for."""
    d = cfg.data
    if d.replay_groups_from:
        return  # the groups are replayed, no query is sampled
    if rows is not None and d.heldout_queries >= rows:
        raise ConfigError(f"data.heldout_queries ({d.heldout_queries}) leaves no training queries: the data yields "
                          f"{rows} (data.max_queries plus the held-out ones at most); hold out fewer or add rows")
    training = rows - d.heldout_queries if rows is not None else d.max_queries
    if training is None:
        return
    pool = training // 2 if cfg.schedule.alternate_splits else training
    steps = [cfg.steps_for_iteration(i) for i in range(1, cfg.run.iterations + 1)]
    wanted = [d.queries_per_iteration or n * cfg.optim.groups_per_step for n in steps]
    if max(wanted) > pool:
        k = wanted.index(max(wanted)) + 1
        how = "data.queries_per_iteration" if d.queries_per_iteration else \
            f"{steps[k - 1]} steps x optim.groups_per_step {cfg.optim.groups_per_step}"
        split = ", half of them per iteration under schedule.alternate_splits" if cfg.schedule.alternate_splits else ""
        raise ConfigError(f"data: iteration {k} samples {max(wanted)} queries ({how}), but there are {pool} to train "
                          f"on ({training} after data.heldout_queries {d.heldout_queries}{split}); add rows (or raise "
                          f"data.max_queries), or set data.queries_per_iteration={pool} or lower")


def check_placements(cfg: TrainConfig, types: list[NodeType] | None = None) -> None:
    """Every placement group the run asks for against the node types of ray_cluster.yaml (`types`): one that no node
    type can hold would wait scaling.placement_timeout_s for nothing. No ray_cluster.yaml: nothing to check."""
    types = node_types() if types is None else types
    if not types:
        return
    groups = resource_plan(cfg)["groups"]
    learners, selector = role_types(types, LEARNER)
    one = learner_bundle(cfg)
    if not any(fits([one], selector, t) for t in types):
        raise ConfigError(f"scaling.gpus_per_learner: one learner asks for {one}, more than any {LEARNER} node type of "
                          f"ray_cluster.yaml has ({largest(learners)}); lower scaling.gpus_per_learner / "
                          f"cpus_per_learner or add a node type that big")
    if not any(fits(groups["learners"]["placement_group"]["bundles"], selector, t) for t in types):
        gpus = [t.max_workers * t.resources.get("GPU", 0) for t in learners]
        raise ConfigError(f"scaling.num_learners: {cfg.scaling.num_learners} learners ask for {one} each, more than "
                          f"the {LEARNER} node types of ray_cluster.yaml can start together (max_workers x GPUs: "
                          f"{max(gpus, default=0):g} GPUs); lower scaling.num_learners or raise max_workers there")
    if cfg.data.replay_groups_from:
        return  # no rollout engine
    engines, selector = role_types(types, ROLLOUT)
    rollout = groups["rollout"]
    group = rollout["placement_group"] or {"strategy": "PACK", "bundles": [
        {"CPU": cfg.rollout.cpus_per_engine, **({"GPU": rollout["gpus_each"]} if rollout["gpus_each"] else {})}]}
    if not any(fits(group["bundles"], selector, t, "STRICT_PACK") for t in types):
        field = "rollout.tensor_parallel_size" if cfg.rollout.tensor_parallel_size > 1 else "rollout.gpus_per_engine"
        raise ConfigError(f"{field}: one {rollout['engine']} engine asks for {rollout['gpus_each']:g} GPU(s) and "
                          f"{rollout['cpus_each']:g} CPU(s) on one node, more than the largest {ROLLOUT} node type of "
                          f"ray_cluster.yaml has ({largest(engines)}); lower {field} to fit it, or add a node type "
                          f"that big to ray_cluster.yaml")


def largest(types: list[NodeType]) -> str:
    """The node type with the most GPUs (then CPUs), as the messages name it."""
    if not types:
        return "none"
    t = max(types, key=lambda t: (t.resources.get("GPU", 0), t.resources.get("CPU", 0)))
    return f"{t.name}: {t.resources.get('GPU', 0):g} GPUs, {t.resources.get('CPU', 0):g} CPUs"


def hub_cached(name: str, repo_type: str) -> bool:
    """Whether a hub repository (`model` or `dataset`) has a snapshot in the local Hugging Face cache."""
    from huggingface_hub.constants import HF_HUB_CACHE

    snapshots = Path(HF_HUB_CACHE) / f"{repo_type}s--{name.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def hub_name(name: str | None) -> bool:
    """A name `from_pretrained` / `load_dataset` would look up on the hub (not built in, not a local path)."""
    return bool(name) and not name.startswith("builtin:") and not Path(name).is_absolute() and not Path(name).exists()


def unchecked_inputs(cfg: TrainConfig, writer_answered: bool | None = None) -> list[str]:
    """What `--dry-run` could not check from here, one line each: hub names not in the local cache, a hub data set's
    rows, a principle writer's endpoint that did not answer (`writer_answers`; the run contacts it before Ray starts)."""
    lines = []
    for field, name in (("model.name_or_path", cfg.model.name_or_path), ("model.tokenizer", cfg.model.tokenizer)):
        if hub_name(name) and not hub_cached(name, "model"):
            lines.append(f"not checked: {field} {name!r} needs the hub (not in the local cache): that it exists, and "
                         f"its size")
    d = cfg.data
    if d.source == "hf" and not d.replay_groups_from and hub_name(d.dataset):
        where = "is in the local cache, but its rows are counted" if hub_cached(d.dataset, "dataset") else \
            "needs the hub (not in the local cache): that it exists, and its rows are counted"
        lines.append(f"not checked: data.dataset {d.dataset!r} {where} only when the run loads it (data."
                     f"heldout_queries {d.heldout_queries} plus the queries an iteration samples must fit)")
    if writer_answered is False:
        lines.append(f"not checked: principles.writer.base_url {cfg.principles.writer.base_url} does not answer from "
                     f"here; the run needs it up before it starts (serve the writer first: docs/cluster.md, step 3)")
    return lines


def writer_answers(cfg: TrainConfig) -> bool | None:
    """Whether a served principle writer answers one request from here (within 5 s); None for no served writer."""
    writer = cfg.principles.writer
    if cfg.principles.source != "writer" or writer.backend not in ("openai", "vllm"):
        return None
    try:
        check_endpoint(writer.model_copy(update={"timeout": min(writer.timeout, 5.0)}),
                       field_prefix="principles.writer", purpose="principles.writer", retries=0)
    except ChatClientError:
        return False
    return True


def check_chat_template(cfg: TrainConfig) -> None:
    """`prompt.template: chat` needs a tokenizer with a chat template: checked where the tokenizer is a local folder
    (a hub name is read when the run loads it; a built-in model has none)."""
    if cfg.prompt.template != "chat":
        return
    name = cfg.model.tokenizer or cfg.model.name_or_path
    field = "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path"
    if name.startswith("builtin:"):
        raise ConfigError(f"prompt.template is 'chat' but {field} {name} is a base model without a chat template: "
                          f"use prompt.template=base")
    folder = Path(name)
    if not (folder.is_absolute() and (folder / "tokenizer_config.json").is_file()):
        return
    has_template = "chat_template" in json.loads((folder / "tokenizer_config.json").read_text()) or any(
        (folder / f).is_file() for f in ("chat_template.jinja", "chat_template.json"))
    if not has_template:
        raise ConfigError(f"prompt.template is 'chat' but the tokenizer in {folder} has no chat template (no "
                          f"chat_template in tokenizer_config.json, no chat_template.jinja): use prompt.template=base")


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
