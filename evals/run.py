"""The evaluation job: `python -m evals.run --config configs/eval_<name>.yaml [key=value ...]`, or
`python -m evals.run --run <a pipelines.train run folder> [key=value ...]`.

Submittable as is: `ray job submit --working-dir . -- python -m evals.run --config ...`. It evaluates
checkpoints exported by training (HF folders) against a baseline model, in four phases, one module each
(this one is the command line and the order they run in):
1. plan (`evals/plan.py`, driver): held-out queries, C constitutions each, prompts (training's planning
   stage); MT-Bench questions and GSM8K items;
2. generate (`evals/generate.py`, one Ray actor per model, GPUs from `generation.gpus_per_model`, a vLLM
   engine's in a placement group of its own): responses, MI bound, MT-Bench answers, GSM8K completions;
3. judge (`evals/judge.py`, driver): win rates against the baseline, MT-Bench grading, the world's rule adherence;
4. report (`evals/report.py`): `results.json`, `report.md` with PNG plots, responses and judgments as JSONL,
   beside each other in `run.output_dir`.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from evals.config import EvalConfig
from evals.log import log
from evals.plan import EvalPlan, library
from sami.config import ConfigError, TrainConfig, build_config, dump_config, load_config, load_yaml
from sami.console import VERBOSE_HELP, console
from sami.run_dir import RunDir, check_model_folders
from sami.tracking import Trackers, check_tracking, evaluation_links, mlflow_uri


DEFAULTS_FROM_RUN = ("generation", "adherence", "judge", "tracking")  # what --config may set instead of the run


def settings_from_run(run: RunDir) -> dict:
    """The evaluation a training run implies: its base model against each complete iteration's HF export, on the
    queries it held out, under its principles and constitution mode, written to <run>/eval."""
    if not run.config.is_file():
        raise ConfigError(f"--run {run.path}: no config.yaml there, so not a pipelines.train run folder")
    train = load_config(run.config, model_cls=TrainConfig)
    if train.prompt.template != "base":  # the evaluation renders the paper's base format only
        raise ConfigError(f"--run {run.path}: the run trained with prompt.template {train.prompt.template!r}, and the "
                          f"evaluation job renders the base format only: its MI bound and responses would not be the "
                          f"run's prompts")
    exported = [k for k in run.complete_iterations() if run.exported(k)]
    if not exported:
        raise ConfigError(f"--run {run.path}: no complete iteration with an HF export yet "
                          f"(iterations complete: {run.complete_iterations() or 'none'}; checkpoint.export_hf)")
    if not train.data.heldout_queries:
        raise ConfigError(f"--run {run.path}: the run held out no queries (its data.heldout_queries is 0); "
                          f"evaluate with --config and data settings of your own")
    world = train.data.task == "world"
    # The world's queries are drawn again from the run's seed (the judge needs the world's source): the rows
    # training cut off, as heldout_queries.jsonl holds them; any other run's are read from that file.
    data = train.data.model_dump(mode="json", exclude={"replay_groups_from", "queries_per_iteration"}) if world else \
        {"source": "jsonl", "path": str(run.heldout_queries), "task": train.data.task, "heldout_queries": 0}
    principles = train.principles.model_dump(mode="json", exclude={"writer"})
    if principles["source"] != "world":  # a file or a writer's: the library the run saved
        principles.update(source="file", path=str(run.principles))
    return {"run": {"name": f"eval-{train.run.name}", "output_dir": str(run.evaluation), "seed": train.run.seed},
            "models": [{"name": "base", "path": train.model.name_or_path}]
                      + [{"name": RunDir.tag(k), "path": str(run.hf(k))} for k in exported],
            "baseline": "base", "data": data, "principles": principles,
            # defaults an evaluation config's sections replace: only the world's rules judge without an endpoint
            "generation": {"sampling": train.sampling.model_dump(mode="json"), "dtype": train.model.dtype,
                           "max_prompt_tokens": train.model.max_prompt_tokens},
            "adherence": {"enabled": world}, "judge": {"backend": "world" if world else "openai"},
            "tracking": tracking_of(train, run)}


def tracking_of(train: TrainConfig, run: RunDir) -> dict:
    """The training run's trackers, for its evaluation: the same MLflow store and experiment, W&B project and
    group, linked to the run (`tracking.training_run`); TensorBoard's files under the evaluation's folder."""
    tracking = train.tracking.model_dump(mode="json")
    tracking.update(run_name=None, training_run=str(run.path), tensorboard={"log_dir": None})
    tracking["mlflow"]["tracking_uri"] = mlflow_uri(train.tracking, run.path)
    return tracking


def load_eval_config(config: str | None, run: str | None, overrides: list[str]) -> EvalConfig:
    """--config alone; or --run, whose settings replace the config's run, models, baseline, data and principles
    sections (its generation, judge and benchmark sections apply)."""
    if run is None:
        return load_config(config, overrides, model_cls=EvalConfig)
    from_run = settings_from_run(RunDir(run))
    defaults = {section: from_run.pop(section) for section in DEFAULTS_FROM_RUN}
    return build_config(EvalConfig, {**defaults, **(load_yaml(config) if config else {}), **from_run}, overrides,
                        f"--run {run}")


def missing_paths(cfg: EvalConfig) -> list[str]:
    """Local files and folders the config names that do not exist here (hub names are not checked)."""
    def local(path: str) -> bool:
        return path.startswith(("/", ".", "~")) or path.count("/") > 1 or path.endswith((".jsonl", ".yaml", ".json"))

    problems = [f"models.{i}.path: no such folder {m.path!r} (an HF export such as <run>/iteration-1/hf, a hub "
                f"name, or builtin:world)" for i, m in enumerate(cfg.models)
                if local(m.path) and not Path(m.path).expanduser().is_dir()]
    files = {"data.path": cfg.data.path if cfg.data.source == "jsonl" and cfg.needs_queries else None,
             "principles.path": cfg.principles.path if cfg.principles.source == "file" and cfg.needs_queries else None,
             "mtbench.questions": cfg.mtbench.questions if cfg.mtbench.enabled else None,
             "mtbench.judge_prompts": cfg.mtbench.judge_prompts if cfg.mtbench.enabled else None,
             "gsm8k.source": cfg.gsm8k.source if cfg.gsm8k.enabled and local(cfg.gsm8k.source) else None}
    problems += [f"{field}: file not found: {path}" for field, path in files.items()
                 if path and not Path(path).expanduser().is_file()]
    return problems


MTBENCH_QUESTIONS = 80  # FastChat's question.jsonl: 8 categories x 10


def judge_calls(cfg: EvalConfig) -> tuple[int | None, str]:
    """(requests the judge gets, how they add up): win rates, one per held-out query and model other than the
    baseline (two with judge.swap); MT-Bench, a grade per question, turn and model and both orders of the first turn
    against the baseline (evals/judge.py). None where the number of queries is known only once they are loaded."""
    others, parts, total = len(cfg.models) - 1, [], 0
    if cfg.win_rates.enabled:
        queries = cfg.num_queries or cfg.data.heldout_queries or None
        orders = 2 if cfg.judge.swap else 1
        if queries is None:
            return None, f"win rates: {others} model(s) x every query loaded x {orders}"
        total += others * queries * orders
        parts.append(f"win rates {others} model(s) x {queries} queries x {orders}")
    if cfg.mtbench.enabled:
        path = Path(cfg.mtbench.questions or "")
        questions = sum(1 for line in path.open() if line.strip()) if path.is_file() else MTBENCH_QUESTIONS
        questions = min(questions, cfg.mtbench.max_questions or questions)
        total += len(cfg.models) * questions * 2 + others * questions * 2
        parts.append(f"MT-Bench {len(cfg.models)} model(s) x {questions} questions x 2 turns + {others} x "
                     f"{questions} pairwise x 2 orders")
    return total, "; ".join(parts)


def judge_line(cfg: EvalConfig) -> str:
    """Who judges, how many requests it gets, and whether its key is set here."""
    j = cfg.judge
    if not (cfg.win_rates.enabled or cfg.mtbench.enabled):
        return "  judge: none needed"
    if j.backend == "world":
        return "  judge: the world's rule judge" + (", both A/B orders" if j.swap else "")
    calls, how = judge_calls(cfg)
    where = f" at {j.base_url}" if j.base_url else ""
    key = ""
    if j.backend in ("openai", "vllm"):
        key = f"; key ${j.api_key_env} " + ("is set here" if os.environ.get(j.api_key_env) else
                                            "is not set here (set it where the job runs)")
    return (f"  judge: {j.backend} {j.model}{where}" + (", both A/B orders" if j.swap else "")
            + f"; {calls if calls is not None else 'an unknown number of'} requests ({how}){key}")


def format_plan(cfg: EvalConfig) -> str:
    """What the job would do, from the config alone (no data or model is loaded)."""
    d, g, j, p = cfg.data, cfg.generation, cfg.judge, cfg.principles
    source = {"world": "the built-in world", "jsonl": d.path}.get(d.source) or f"{d.dataset} {d.subset or ''} ({d.split} split)"
    held = f"the last {d.heldout_queries} queries training held out" if d.heldout_queries else "every query"
    benchmarks = ["win rates (raw, length-balanced, logistic; bootstrap 95% intervals)"] if cfg.win_rates.enabled else []
    benchmarks += ["MI bound"] if cfg.mi_bound.enabled else []
    if cfg.adherence.enabled:
        extra = cfg.adherence.heldout_principle_queries
        benchmarks.append("the world's rule adherence" + (f" (and the held-out principle on {extra} more queries)"
                                                           if extra else ""))
        if cfg.principles.heldout_members:
            benchmarks.append("a family member stated per query, trained and held-out in turn ("
                              + ", ".join(cfg.principles.heldout_members) + " held out)")
    if cfg.mtbench.enabled:
        benchmarks.append(f"MT-Bench ({cfg.mtbench.questions or 'questions from the hub'}; single and pairwise"
                          + (", principle-conditioned" if cfg.mtbench.principle_conditioned else "") + ")")
    if cfg.gsm8k.enabled:
        benchmarks.append(f"GSM8K ({cfg.gsm8k.source} {cfg.gsm8k.split}; greedy" +
                          (f", pass@{cfg.gsm8k.k} from {cfg.gsm8k.num_samples} samples" if cfg.gsm8k.num_samples else "") + ")")
    queries = (f"  queries: {source}, {held}" + (f", at most {cfg.num_queries}" if cfg.num_queries else "")
               + f"; {p.num_constitutions} constitutions each ({p.mode})") if cfg.needs_queries else "  queries: none"
    return "\n".join([
        f"evaluation {cfg.run.name}: {len(cfg.models)} model(s) against baseline {cfg.baseline_name!r} -> {cfg.run.output_dir}",
        *(f"  model {m.name}: {m.path}" for m in cfg.models),
        queries,
        f"  generation: {g.engine}, one Ray actor per model with {g.cpus_per_model:g} CPU and {g.gpus_per_model:g} GPU "
        f"(at most {len(cfg.models) * g.gpus_per_model:g} GPUs at once)",
        judge_line(cfg),
        f"  benchmarks: {'; '.join(benchmarks) or 'none'}",
    ])


def prepare(cfg: EvalConfig) -> tuple[EvalPlan, Path]:
    """Phase 1 and what the later phases need: inputs checked, the plan, a live judge, the models, the log file."""
    from evals.plan import build_plan
    from sami.chat_clients import check_endpoint
    from sami.world.base_model import resolve_model  # torch and transformers: not for --dry-run

    problems = missing_paths(cfg)
    if problems:
        raise ConfigError("\n".join(problems))
    log(f"phase 1/4: plan ({', '.join(m.name for m in cfg.models)} vs baseline {cfg.baseline_name!r})")
    plan = build_plan(cfg)
    log(f"plan: {len(plan.groups)} held-out queries x {cfg.principles.num_constitutions} constitutions"
        + (f", {len(plan.mtbench_questions)} MT-Bench questions" if cfg.mtbench.enabled else "")
        + (f", {len(plan.gsm8k_items)} GSM8K problems" if cfg.gsm8k.enabled else ""))
    if cfg.win_rates.enabled or cfg.mtbench.enabled:  # a down judge stops the job before it generates anything
        check_endpoint(cfg.judge, field_prefix="judge", purpose="judge")
    for model in cfg.models:  # builtin:world is the world's cached base model
        model.path = resolve_model(model.path, log)
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    opened = console.open_log(out / "job.log")
    if opened:
        log(opened)
    return plan, out


def record_metrics(metrics, results: dict) -> None:
    """Each model's headline figures for the Ray dashboard."""
    for index, m in enumerate(results["models"].values()):
        figures = {"mi_lower_bound": m["mi_lower_bound"],
                   "win_rate": (m["win_rate_vs_baseline"] or {}).get("balanced", {}).get("win_rate"),
                   "adherence": (m["adherence"] or {}).get("mean")}
        metrics.record(index, {k: v for k, v in figures.items() if v is not None})


def run(cfg: EvalConfig, judge_only: bool = False) -> Path:
    from actors.ray_session import connect_ray
    from evals.generate import generate_all, load_outputs, save_outputs
    from evals.judge import judge_all
    from evals.report import build_results, write_report
    from sami.metrics import RunMetrics

    plan, out = prepare(cfg)
    if not judge_only:
        connect_ray(math.ceil(cfg.generation.cpus_per_model) + 1, uses_gpu=cfg.generation.gpus_per_model > 0)
    metrics = RunMetrics("eval", cfg.run.name)  # after connecting: outside Ray the metrics are inactive
    if judge_only:
        log("phase 2/4: generate: skipped (--judge-only), judging the saved responses")
        outputs = load_outputs(cfg, plan, out)
    else:
        metrics.set_phase("generate")
        log(f"phase 2/4: generate ({cfg.generation.engine} engine, one Ray actor per model)")
        outputs = generate_all(cfg, plan)
        save_outputs(cfg, plan, outputs, out)
    metrics.set_phase("evaluate")
    log(f"phase 3/4: judge ({cfg.judge.backend} judge" + (f" {cfg.judge.model}" if cfg.judge.model else "") + ")")
    results = build_results(cfg, plan, outputs, judge_all(cfg, plan, outputs, out))
    record_metrics(metrics, results)
    log("phase 4/4: report")
    # config.yaml and results.json change together, and only here: a failed run leaves the previous pair.
    dump_config(cfg, out / "config.yaml.tmp")
    report = write_report(out, results)
    os.replace(out / "config.yaml.tmp", out / "config.yaml")
    track(cfg, results, out)
    metrics.set_phase("idle")
    log(f"done: {report} (results.json, responses/, judgments/)")
    return out


def dry_run_warnings(cfg: EvalConfig) -> list[str]:
    """What `--dry-run` cannot find from here: files the config names, the judge's endpoint (one request)."""
    from sami.chat_clients import ChatClientError, check_endpoint

    warnings = [f"warning: {problem} (fine if it is on the cluster's storage)" for problem in missing_paths(cfg)]
    if cfg.win_rates.enabled or cfg.mtbench.enabled:
        try:
            check_endpoint(cfg.judge, field_prefix="judge", purpose="judge", retries=0)
        except ChatClientError as e:
            warnings.append(f"warning: {e} (fine if the endpoint is reachable from the cluster)")
    return warnings
def track(cfg: EvalConfig, results: dict, out: Path) -> None:
    """The results (every model's figures) and the report files in the trackers `tracking.trackers` names, as a
    new tracker run linked to the training run evaluated; a tracker that fails is one warning."""
    if not cfg.tracking.trackers:
        return
    trackers = Trackers.start(cfg.tracking, out, cfg.run.name, cfg, log, links=evaluation_links(cfg.tracking),
                              continue_runs=False)
    trackers.log_results(results["models"], [out / "report.md", out / "results.json", *sorted(out.glob("*.png"))])
    trackers.close(completed=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.run", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="an evaluation config (configs/eval_*.yaml); with --run, its judge and "
                                         "benchmark settings")
    parser.add_argument("--run", help="a pipelines.train run folder: evaluate its base model and every complete "
                                      "iteration's HF export on the queries it held out (results in <run>/eval)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. run.output_dir=runs/eval2")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, the principle file and the judge endpoint; print what would run")
    parser.add_argument("--judge-only", action="store_true",
                        help="judge the responses a previous run of this config saved in run.output_dir/responses/ "
                             "instead of generating them again (no Ray)")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP + " (run.output_dir/job.log)")
    args = parser.parse_args(argv)
    if not (args.config or args.run):
        parser.error("give --config, --run or both")
    from evals.gsm8k import GSM8KError
    from evals.mtbench import MTBenchError
    from sami.chat_clients import ChatClientError
    from sami.principles import PrincipleError

    with console.session(verbose=args.verbose):
        try:
            cfg = load_eval_config(args.config, args.run, args.overrides)
            check_model_folders(m.path for m in cfg.models)  # before --dry-run's "config OK" and any model loads
            if args.dry_run:
                check_tracking(cfg.tracking)
                print(format_plan(cfg))
                if cfg.needs_queries and cfg.principles.source == "file" and Path(cfg.principles.path).is_file():
                    library(cfg)  # present but malformed: an error here too
                warnings = dry_run_warnings(cfg)
                for warning in warnings:
                    print(warning)
                print(f"config OK, {len(warnings)} warning(s) above; nothing started (--dry-run)" if warnings
                      else "config OK; nothing started (--dry-run)")
                return 0
            run(cfg, judge_only=args.judge_only)
        except (ConfigError, ChatClientError, MTBenchError, GSM8KError, PrincipleError) as e:
            console.error(f"error: {e}")
            return 2
        return 0


if __name__ == "__main__":
    sys.exit(main())
