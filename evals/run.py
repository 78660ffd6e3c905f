"""The evaluation job: `python -m evals.run --config configs/eval_<name>.yaml [key=value ...]`.

Submittable as is: `ray job submit --working-dir . -- python -m evals.run --config ...`. It evaluates
checkpoints exported by training (HF folders) against a baseline model:
1. plan (driver): held-out queries, C constitutions each, prompts; MT-Bench questions and GSM8K items;
2. generate (one Ray task per model, GPUs from `generation.gpus_per_model`, a vLLM engine's in a placement
   group of its own): responses, MI bound,
   MT-Bench answers, GSM8K completions;
3. judge (driver; an HTTP judge answers `judge.concurrency` requests at a time): every model against the
   baseline with a random A/B order per item, raw / length-balanced / logistic win rates with bootstrap
   intervals; MT-Bench single-answer and pairwise grading; in the built-in world, rule adherence per item;
4. report: `results.json`, `report.md` with PNG plots, responses and judgments as JSONL, beside each other
   in `run.output_dir`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

from evals.config import EvalConfig
from evals.generate import EvalPlan, HeldoutPrincipleItems
from sami.config import ConfigError, dump_config, load_config
from sami.console import VERBOSE_HELP, console
from sami.run_dir import check_model_folders


def log(message: str) -> None:
    console.say(f"[eval {time.strftime('%H:%M:%S')}] {message}")


def load_library(cfg: EvalConfig):
    from sami.principles import load_principles

    if cfg.principles.source == "world":
        from sami.world.rules import PRINCIPLES

        return list(PRINCIPLES)
    return load_principles(cfg.principles.path)


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
    if cfg.mtbench.enabled:
        benchmarks.append(f"MT-Bench ({cfg.mtbench.questions or 'questions from the hub'}; single and pairwise"
                          + (", principle-conditioned" if cfg.mtbench.principle_conditioned else "") + ")")
    if cfg.gsm8k.enabled:
        benchmarks.append(f"GSM8K ({cfg.gsm8k.source} {cfg.gsm8k.split}; greedy" +
                          (f", pass@{cfg.gsm8k.k} from {cfg.gsm8k.num_samples} samples" if cfg.gsm8k.num_samples else "") + ")")
    judge = "none needed" if not (cfg.win_rates.enabled or cfg.mtbench.enabled) else "the world's rule judge" if j.backend == "world" else (
        f"{j.backend} {j.model}" + (f" at {j.base_url} (key from ${j.api_key_env})" if j.base_url else ""))
    queries = (f"  queries: {source}, {held}" + (f", at most {cfg.num_queries}" if cfg.num_queries else "")
               + f"; {p.num_constitutions} constitutions each ({p.mode})") if cfg.needs_queries else "  queries: none"
    return "\n".join([
        f"evaluation {cfg.run.name}: {len(cfg.models)} model(s) against baseline {cfg.baseline_name!r} -> {cfg.run.output_dir}",
        *(f"  model {m.name}: {m.path}" for m in cfg.models),
        queries,
        f"  generation: {g.engine}, one Ray task per model with {g.cpus_per_model:g} CPU and {g.gpus_per_model:g} GPU "
        f"(at most {len(cfg.models) * g.gpus_per_model:g} GPUs at once)",
        f"  judge: {judge}" + (", both A/B orders" if j.swap else ""),
        f"  benchmarks: {'; '.join(benchmarks) or 'none'}",
    ])


def heldout_principle_items(cfg: EvalConfig, rows: list[dict], principles: list) -> HeldoutPrincipleItems:
    """Each query's positive constitution states the held-out principle(s) and as many training principles,
    drawn per query, as make up `principles_per_constitution` (as training draws them)."""
    from sami.constitutions import Constitution, render_constitution
    from sami.prompts import generation_prompt

    p, heldout = cfg.principles, cfg.principles.heldout_names
    if not heldout:
        raise ConfigError("adherence.heldout_principle_queries: there is no held-out principle (principles.heldout)")
    training = [q.name for q in principles if q.name not in heldout]
    count = (p.principles_per_constitution or len(training)) - len(heldout)
    if not 0 <= count <= len(training):
        raise ConfigError(f"adherence.heldout_principle_queries: principles.principles_per_constitution "
                          f"({p.principles_per_constitution}) leaves no room for the held-out principle(s) {list(heldout)}")
    library = {q.name: q for q in principles}
    items = HeldoutPrincipleItems([], [], [], [])
    for row in rows:
        key = f"eval-heldout-principle/{cfg.run.seed}/{row['query_id']}"
        rng = random.Random(key)
        constitution = Constitution(tuple((name, True) for name in sorted(rng.sample(training, count) + list(heldout))))
        text = render_constitution(constitution, library, rng)
        items.rows.append(row)
        items.constitutions.append(constitution)
        items.constitution_texts.append(text)
        items.generation_prompts.append(generation_prompt(cfg.data.task, text, row["query"]))
    return items


def build_plan(cfg: EvalConfig) -> EvalPlan:
    from sami.constitutions import render_constitution, sample_constitutions
    from sami.data import load_queries, split_queries
    from sami.prompts import generation_prompt, training_prompt

    rows, extra_rows, wanted = [], [], cfg.adherence.heldout_principle_queries
    if cfg.needs_queries:
        rows = load_queries(cfg.data, cfg.run.seed)
        if cfg.data.heldout_queries:
            rows = split_queries(rows, cfg.data.heldout_queries)[1]
        rows, extra_rows = rows[: cfg.num_queries], rows[cfg.num_queries :][:wanted] if wanted else []
        if len(extra_rows) < wanted:
            raise ConfigError(f"adherence.heldout_principle_queries ({wanted}) needs {cfg.num_queries} + {wanted} "
                              f"held-out queries, there are {len(rows) + len(extra_rows)} (data.heldout_queries)")
    p = cfg.principles
    principles = load_library(cfg) if rows else []
    library = {p.name: p for p in principles}
    plan = EvalPlan(rows, [], [], [], [])
    for row in rows:
        key = f"eval/{cfg.run.seed}/{row['query_id']}"
        try:
            constitutions = sample_constitutions(principles, p.num_constitutions, p.mode, random.Random(key),
                                                 k=p.principles_per_constitution, heldout=p.heldout_names)
        except ValueError as e:
            raise ConfigError(f"principles: {e}") from None
        texts = [render_constitution(c, library, random.Random(f"{key}/{i}")) for i, c in enumerate(constitutions)]
        plan.constitutions.append(constitutions)
        plan.constitution_texts.append(texts)
        plan.generation_prompts.append([generation_prompt(cfg.data.task, t, row["query"]) for t in texts])
        plan.training_prompts.append([training_prompt(cfg.data.task, t, row["query"]) for t in texts])
    if extra_rows:
        plan.heldout_principle = heldout_principle_items(cfg, extra_rows, principles)
    if cfg.mtbench.enabled:
        from evals.mtbench import load_questions

        plan.mtbench_questions = load_questions(cfg.mtbench.questions)[: cfg.mtbench.max_questions]
    if cfg.gsm8k.enabled:
        from evals.gsm8k import load_gsm8k

        plan.gsm8k_items = load_gsm8k(cfg.gsm8k.source, cfg.gsm8k.split, cfg.gsm8k.max_items)
    return plan


def words(text: str) -> int:
    return len(text.split())


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def generate_all(cfg: EvalConfig, plan: EvalPlan) -> dict[str, dict]:
    """One Ray task per model. A vLLM model's task runs in a placement group of its own (its GPUs, reserved
    once: a plain task with num_gpus would make vLLM reserve as many again), released when the task ends."""
    import ray
    from ray.util.placement_group import remove_placement_group

    from actors.rollout import vllm_placement
    from evals.generate import model_outputs

    task = ray.remote(model_outputs)
    plan_ref = ray.put(plan)
    pending, groups = {}, {}
    for m in cfg.models:
        if cfg.generation.engine == "vllm":
            groups[m.name], options = vllm_placement(cfg.generation.tensor_parallel_size)
        else:
            options = {"num_cpus": cfg.generation.cpus_per_model, "num_gpus": cfg.generation.gpus_per_model}
        pending[task.options(max_retries=0, **options).remote(m, cfg, plan_ref)] = m.name
    outputs = {}
    try:
        while pending:
            (done,), _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(done)
            if name in groups:
                remove_placement_group(groups.pop(name))
            try:
                outputs[name] = ray.get(done)
            except ray.exceptions.RayTaskError as e:
                path = next(m.path for m in cfg.models if m.name == name)
                raise ConfigError(f"model {name!r} ({path}) could not be evaluated: {e.cause!r}") from None
            log(f"generate: {name} done in {outputs[name]['seconds']:.0f}s ({len(outputs)}/{len(cfg.models)} models)")
    finally:
        for pg in groups.values():
            remove_placement_group(pg)
    return {m.name: outputs[m.name] for m in cfg.models}


def judge_win_rates(cfg: EvalConfig, judge, plan: EvalPlan, outputs: dict, out: Path) -> dict[str, dict]:
    from evals.win_rates import Judgements, judge_against_baseline, summarise

    baseline = cfg.baseline_name
    base_responses = [r[0] for r in outputs[baseline]["responses"]]
    queries = [row["query"] for row in plan.rows]
    positive_texts = [texts[0] for texts in plan.constitution_texts]
    metadata = [{"constitution": cons[0], "subject": row["subject"]} for cons, row in zip(plan.constitutions, plan.rows)]
    summaries = {}
    for name, output in outputs.items():
        if name == baseline:
            continue
        test = [r[0] for r in output["responses"]]
        started, transcripts = time.time(), []
        scores = judge_against_baseline(judge, queries, positive_texts, test, base_responses, seed=cfg.run.seed,
                                        swap=cfg.judge.swap, metadata=metadata, transcripts=transcripts)
        judgements = Judgements(scores, [words(r) for r in base_responses], [words(r) for r in test])
        summaries[name] = summarise(judgements, cfg.win_rates.bootstrap, cfg.run.seed)
        summaries[name]["scores"] = [float(s) for s in scores]  # per item, for intervals over several runs
        summaries[name]["unparsed"] = sum(not t["parsed"] for one_pass in transcripts for t in one_pass)
        write_jsonl(out / "judgments" / f"{name}-vs-{baseline}.jsonl", [
            {"query_id": row["query_id"], "score": float(s), "baseline_len": words(b), "test_len": words(t),
             "passes": [p[i] for p in transcripts]}
            for i, (row, s, b, t) in enumerate(zip(plan.rows, scores, base_responses, test))])
        s = summaries[name]
        log(f"judge: {name} vs {baseline}: win rate {s['raw']['win_rate']:.3f}, length-balanced "
            f"{s['balanced']['win_rate']:.3f} [{s['balanced']['ci'][0]:.3f}, {s['balanced']['ci'][1]:.3f}] "
            f"({len(scores)} items, {time.time() - started:.0f}s)")
    return summaries


def judge_adherence(cfg: EvalConfig, plan: EvalPlan, outputs: dict, out: Path) -> dict[str, dict]:
    """The world's rule adherence of every model; each check per item in judgments/<model>-adherence.jsonl."""
    from evals.world import adherence_records, summarise_adherence

    positive = [cons[0] for cons in plan.constitutions]
    extra = plan.heldout_principle
    summaries = {}
    for name, output in outputs.items():
        records = adherence_records(plan.rows, positive, [r[0] for r in output["responses"]])
        heldout = adherence_records(extra.rows, extra.constitutions, output["heldout_principle_responses"]) if extra else []
        summaries[name] = summarise_adherence(records, heldout, cfg.principles.heldout_names)
        write_jsonl(out / "judgments" / f"{name}-adherence.jsonl",
                    [{"items": "main", **r} for r in records] + [{"items": "heldout_principle", **r} for r in heldout])
        s = summaries[name]
        log(f"adherence: {name}: {s['mean']:.3f}, well-formed {s['well_formed']:.3f}"
            + (f", held-out principle {s['heldout_principle']:.3f}" if heldout else ""))
    return summaries


def judge_mtbench(cfg: EvalConfig, client, plan: EvalPlan, outputs: dict, out: Path) -> dict[str, dict]:
    from evals.mtbench import category_table, judge_pairwise, judge_single, load_judge_prompts

    prompts = load_judge_prompts(cfg.mtbench.judge_prompts)
    principles = "\n".join(f"- {p.definition}" for p in load_library(cfg)) if cfg.mtbench.principle_conditioned else None
    answers = {name: {a.question_id: a for a in o["mtbench_answers"]} for name, o in outputs.items()}
    baseline = cfg.baseline_name
    tables = {}
    for name, by_id in answers.items():
        single = judge_single(client, prompts, plan.mtbench_questions, by_id)
        write_jsonl(out / "mtbench" / "judgments" / f"{name}-single.jsonl", single)
        tables[name] = {"single": {f"turn_{t}": category_table([r for r in single if r["turn"] == t]) for t in (1, 2)},
                        "pairwise": None}
        if name != baseline:
            pairwise = judge_pairwise(client, prompts, plan.mtbench_questions, by_id, answers[baseline],
                                      principles=principles)
            write_jsonl(out / "mtbench" / "judgments" / f"{name}-vs-{baseline}.jsonl", pairwise)
            tables[name]["pairwise"] = category_table(pairwise)
        log(f"mt-bench: {name}: mean score turn 1 {tables[name]['single']['turn_1']['overall']['mean']:.2f}")
    return tables


def save_outputs(cfg: EvalConfig, plan: EvalPlan, outputs: dict, out: Path) -> None:
    """What judging needs from each model, written before judging so `--judge-only` can judge it again:
    responses/<model>.jsonl (one row per query), responses/<model>.json (its figures), MT-Bench answers."""
    from evals.mtbench import write_answers

    for name, output in outputs.items():
        write_jsonl(out / "responses" / f"{name}.jsonl", [
            {"query_id": row["query_id"], "query": row["query"], "constitution": texts[0], "prompt": prompts[0],
             "response": responses[0], "length_words": words(responses[0])}
            for row, texts, prompts, responses in zip(plan.rows, plan.constitution_texts, plan.generation_prompts,
                                                      output["responses"])])
        if plan.heldout_principle:
            extra = plan.heldout_principle
            write_jsonl(out / "responses" / f"{name}.heldout-principle.jsonl", [
                {"query_id": row["query_id"], "query": row["query"], "constitution": text, "prompt": prompt,
                 "response": response}
                for row, text, prompt, response in zip(extra.rows, extra.constitution_texts, extra.generation_prompts,
                                                        output["heldout_principle_responses"])])
        path = next(m.path for m in cfg.models if m.name == name)
        (out / "responses" / f"{name}.json").write_text(json.dumps(
            {"path": path, **{k: output[k] for k in ("mi_lower_bound", "mi_bounds", "gsm8k", "seconds")}}))
        if output["mtbench_answers"] is not None:
            write_answers(str(out / "mtbench" / "model_answer" / f"{name}.jsonl"), output["mtbench_answers"])


def load_outputs(cfg: EvalConfig, plan: EvalPlan, out: Path) -> dict[str, dict]:
    """`--judge-only`: each model's outputs as `save_outputs` wrote them, checked against this config's plan."""
    from evals.mtbench import read_answers

    def saved_rows(path: Path, rows: list[dict], texts: list[str]) -> list[dict]:
        if not path.is_file():
            raise ConfigError(f"--judge-only: no saved responses {path}; run once without --judge-only")
        saved = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if [(r["query_id"], r["constitution"]) for r in saved] != [(row["query_id"], t) for row, t in zip(rows, texts)]:
            raise ConfigError(f"--judge-only: {path} answers other queries or constitutions than this config asks "
                              f"for; run without --judge-only to generate again")
        return saved

    outputs = {}
    extra = plan.heldout_principle
    for m in cfg.models:
        figures_path = out / "responses" / f"{m.name}.json"
        if not figures_path.is_file():
            raise ConfigError(f"--judge-only: no saved responses for model {m.name!r} ({figures_path}); run once "
                              f"without --judge-only")
        figures = json.loads(figures_path.read_text())
        if figures["path"] != m.path:
            raise ConfigError(f"--judge-only: {figures_path} answers another model ({figures['path']}) than this "
                              f"config asks for; run without --judge-only to generate again")
        rows = saved_rows(out / "responses" / f"{m.name}.jsonl", plan.rows, [t[0] for t in plan.constitution_texts])
        heldout = saved_rows(out / "responses" / f"{m.name}.heldout-principle.jsonl", extra.rows,
                             extra.constitution_texts) if extra else None
        answers = out / "mtbench" / "model_answer" / f"{m.name}.jsonl"
        outputs[m.name] = {**figures, "responses": [[r["response"]] for r in rows],
                           "heldout_principle_responses": [r["response"] for r in heldout] if extra else None,
                           "mtbench_answers": list(read_answers(str(answers)).values()) if cfg.mtbench.enabled else None}
    return outputs


def run(cfg: EvalConfig, judge_only: bool = False) -> Path:
    from actors.ray_session import connect_ray
    from evals.judges import make_judge
    from evals.report import write_report
    from sami.chat_clients import check_endpoint
    from sami.metrics import RunMetrics
    from sami.world.base_model import resolve_model  # torch and transformers: not for --dry-run

    problems = missing_paths(cfg)
    if problems:
        raise ConfigError("\n".join(problems))
    log(f"phase 1/4: plan ({', '.join(m.name for m in cfg.models)} vs baseline {cfg.baseline_name!r})")
    plan = build_plan(cfg)
    log(f"plan: {len(plan.rows)} held-out queries x {cfg.principles.num_constitutions} constitutions"
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
    if not judge_only:
        connect_ray(math.ceil(cfg.generation.cpus_per_model) + 1, uses_gpu=cfg.generation.gpus_per_model > 0)
    metrics = RunMetrics("eval", cfg.run.name)  # after connecting: outside Ray the metrics are inactive
    if judge_only:
        log("phase 2/4: generate: skipped (--judge-only), judging the saved responses")
        outputs = load_outputs(cfg, plan, out)
    else:
        metrics.set_phase("generate")
        log(f"phase 2/4: generate ({cfg.generation.engine} engine, one Ray task per model)")
        outputs = generate_all(cfg, plan)
        save_outputs(cfg, plan, outputs, out)
    metrics.set_phase("evaluate")
    log(f"phase 3/4: judge ({cfg.judge.backend} judge" + (f" {cfg.judge.model}" if cfg.judge.model else "") + ")")
    judge = make_judge(cfg.judge) if cfg.win_rates.enabled or cfg.mtbench.enabled else None
    win_rates = judge_win_rates(cfg, judge, plan, outputs, out) if cfg.win_rates.enabled else {}
    mtbench = judge_mtbench(cfg, judge.client, plan, outputs, out) if cfg.mtbench.enabled else {}
    adherence = judge_adherence(cfg, plan, outputs, out) if cfg.adherence.enabled else {}
    models = {}
    for index, m in enumerate(cfg.models):
        o = outputs[m.name]
        gsm = o["gsm8k"]
        lengths = [words(r[0]) for r in o["responses"]]
        models[m.name] = {
            "path": m.path,
            "mean_length": sum(lengths) / len(lengths) if lengths else None,
            "lengths": lengths,
            "mi_lower_bound": o["mi_lower_bound"],
            "mi_bounds": o["mi_bounds"],
            "win_rate_vs_baseline": win_rates.get(m.name),
            "adherence": adherence.get(m.name),
            "mtbench": mtbench.get(m.name),
            "gsm8k": {k: v for k, v in gsm.items() if k != "items"} if gsm else None,
        }
        figures = {"mi_lower_bound": o["mi_lower_bound"]}
        if m.name in win_rates:
            figures["win_rate"] = win_rates[m.name]["balanced"]["win_rate"]
        if m.name in adherence:
            figures["adherence"] = adherence[m.name]["mean"]
        metrics.record(index, {k: v for k, v in figures.items() if v is not None})
    log("phase 4/4: report")
    meta = {"name": cfg.run.name, "seed": cfg.run.seed, "baseline": cfg.baseline_name, "queries": len(plan.rows),
            "heldout_principle_queries": len(plan.heldout_principle.rows) if plan.heldout_principle else 0,
            "heldout_principles": list(cfg.principles.heldout_names),
            "constitutions_per_query": cfg.principles.num_constitutions, "judge": {"backend": cfg.judge.backend,
            "model": cfg.judge.model, "swap": cfg.judge.swap}}
    # config.yaml and results.json change together, and only here: a failed run leaves the previous pair.
    dump_config(cfg, out / "config.yaml.tmp")
    report = write_report(out, {"meta": meta, "models": models})
    os.replace(out / "config.yaml.tmp", out / "config.yaml")
    metrics.set_phase("idle")
    log(f"done: {report} (results.json, responses/, judgments/)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.run", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="an evaluation config (configs/eval_*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. run.output_dir=runs/eval2")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, the principle file and the judge endpoint; print what would run")
    parser.add_argument("--judge-only", action="store_true",
                        help="judge the responses a previous run of this config saved in run.output_dir/responses/ "
                             "instead of generating them again (no Ray)")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP + " (run.output_dir/job.log)")
    args = parser.parse_args(argv)
    from evals.gsm8k import GSM8KError
    from evals.mtbench import MTBenchError
    from sami.chat_clients import ChatClientError, check_endpoint
    from sami.principles import PrincipleError

    with console.session(verbose=args.verbose):
        try:
            cfg = load_config(args.config, args.overrides, model_cls=EvalConfig)
            check_model_folders(m.path for m in cfg.models)  # before --dry-run's "config OK" and any model loads
            if args.dry_run:
                print(format_plan(cfg))
                for problem in missing_paths(cfg):
                    print(f"warning: {problem} (fine if it is on the cluster's storage)")
                if cfg.needs_queries and cfg.principles.source == "file" and Path(cfg.principles.path).is_file():
                    load_library(cfg)  # present but malformed: an error here too
                if cfg.win_rates.enabled or cfg.mtbench.enabled:
                    try:
                        check_endpoint(cfg.judge, field_prefix="judge", purpose="judge", retries=0)
                    except ChatClientError as e:
                        print(f"warning: {e} (fine if the endpoint is reachable from the cluster)")
                print("config OK; nothing started (--dry-run)")
                return 0
            run(cfg, judge_only=args.judge_only)
        except (ConfigError, ChatClientError, MTBenchError, GSM8KError, PrincipleError) as e:
            console.error(f"error: {e}")
            return 2
        return 0


if __name__ == "__main__":
    sys.exit(main())
