"""The evaluation job end to end: two tiny checkpoints, a judge served over real HTTP on loopback in the
OpenAI chat format, win rates, MI bound, MT-Bench (both modes) and GSM8K pass@k, and the report."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chat_server import ChatServer
from evals.judges import JudgeItem, LLMJudge, parse_final_answer

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, expected", [
    ("Comparison: A names the river, B does not.\nFinal answer: A", 1.0),
    ("Comparison: ...\nFinal Answer: **B**", 0.0),
    ("Final answer: A\n(on reflection)\nFinal answer: B", 0.0),  # the last verdict counts
    ("Both are fine.\nB", 0.0),  # a bare letter on the last line
    ("Both responses are equally good.", None),
    ("Final answer: neither", None),
])
def test_parse_final_answer(text, expected):
    assert parse_final_answer(text) == expected


class ScriptedClient:
    def __init__(self, answers):
        self.answers, self.messages = list(answers), []

    def complete(self, messages, temperature=0.0, max_tokens=1024):
        self.messages.append(messages)
        return self.answers.pop(0)


def test_llm_judge_prompt_and_scores():
    client = ScriptedClient(["Final answer: A", "I cannot decide.", "Final answer: B"])
    items = [JudgeItem(query=f"q{i}", constitution="1. Be concise.", response_a=f"a{i}", response_b=f"b{i}",
                       reference="42" if i == 0 else None) for i in range(3)]
    judged = LLMJudge(client, concurrency=1).judgments(items)
    assert [j["score"] for j in judged] == [1.0, 0.5, 0.0]
    assert [j["parsed"] for j in judged] == [True, False, True]
    prompt = client.messages[0][1]["content"]
    assert "1. Be concise." in prompt and "Response A: a0" in prompt and "Response B: b0" in prompt
    assert "Reference answer: 42" in prompt and "Reference answer" not in client.messages[1][1]["content"]


# ---- the job ----

RESPONSE = re.compile(r"Response A: (.*?)\n\nResponse B: (.*?)\n\nFIRST", re.S)


def judge_answer(body):
    """What the loopback judge answers: the shorter response wins the SAMI-style comparison (equal lengths:
    an answer with no verdict); MT-Bench grades are 7, pairwise verdicts [[A]]."""
    system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
    if "Response A:" in user:
        a, b = RESPONSE.search(user).groups()
        if len(a) == len(b):
            return "They are the same length; I cannot choose."
        return f"Comparison: one is shorter.\nFinal answer: {'A' if len(a) < len(b) else 'B'}"
    if "[[A]]" in system:
        return "Assistant A is better. [[A]]"
    return "A decent answer. Rating: [[7]]"


JUDGE_PROMPTS = [  # FastChat's judge prompt names and fields, short texts
    {"name": "single-v1", "type": "single", "system_prompt": "Rate the answer 1-10 as [[rating]].",
     "prompt_template": "Q: {question}\nA: {answer}", "output_format": "[[rating]]"},
    {"name": "single-v1-multi-turn", "type": "single", "system_prompt": "Rate the second answer as [[rating]].",
     "prompt_template": "Q1: {question_1}\nA1: {answer_1}\nQ2: {question_2}\nA2: {answer_2}", "output_format": "[[rating]]"},
    {"name": "single-math-v1", "type": "single", "system_prompt": "Rate against the reference as [[rating]].",
     "prompt_template": "Q: {question}\nRef: {ref_answer_1}\nA: {answer}", "output_format": "[[rating]]"},
    {"name": "single-math-v1-multi-turn", "type": "single", "system_prompt": "Rate the second answer as [[rating]].",
     "prompt_template": "Q1: {question_1}\nRef1: {ref_answer_1}\nA1: {answer_1}\nQ2: {question_2}\nRef2: {ref_answer_2}\n"
                        "A2: {answer_2}", "output_format": "[[rating]]"},
    {"name": "pair-v2", "type": "pairwise", "system_prompt": "Output [[A]], [[B]] or [[C]].",
     "prompt_template": "Q: {question}\nA: {answer_a}\nB: {answer_b}", "output_format": "[[A]]"},
    {"name": "pair-math-v1", "type": "pairwise", "system_prompt": "Use the reference. Output [[A]], [[B]] or [[C]].",
     "prompt_template": "Q: {question}\nRef: {ref_answer_1}\nA: {answer_a}\nB: {answer_b}", "output_format": "[[A]]"},
]
QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a note about a river.", "Make it shorter."]},
    {"question_id": 111, "category": "math", "turns": ["What is 2 + 3?", "And 2 + 4?"], "reference": ["5", "6"]},
]
GSM8K = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A box holds 10 pens. How many pens are in 2 boxes?", "answer": "10 * 2 = 20\n#### 20"},
]


def write_inputs(tmp_path: Path, tiny_model_dir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The second checkpoint: the tiny model with perturbed weights, exported like a training iteration.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trained = tmp_path / "run" / "iteration-1" / "hf"
    model.save_pretrained(trained)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(trained)

    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q{i}", "query": f"Tell me about the {s}."}) + "\n"
                               for i, s in enumerate(["river", "mountain", "bread", "city", "forest", "sea"] * 4)))
    principles = tmp_path / "principles.yaml"
    principles.write_text(yaml.safe_dump([
        {"name": "concise", "definition": "Be concise.", "antithesis": "Be verbose."},
        {"name": "polite", "definition": "Be polite.", "antithesis": "Be curt."}]))
    (tmp_path / "judge_prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in JUDGE_PROMPTS))
    (tmp_path / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "gsm8k.jsonl").write_text("".join(json.dumps(g) + "\n" for g in GSM8K))
    return {"trained": trained, "queries": queries, "principles": principles}


def eval_config(tmp_path: Path, tiny_model_dir: Path, inputs: dict, judge_url: str) -> Path:
    config = {
        "run": {"name": "eval-test", "output_dir": str(tmp_path / "eval"), "seed": 3},
        "models": [{"name": "base", "path": str(tiny_model_dir)}, {"name": "sami-iter1", "path": str(inputs["trained"])}],
        "baseline": "base",
        "data": {"source": "jsonl", "path": str(inputs["queries"]), "task": "dialogue", "heldout_queries": 0},
        "num_queries": 20,
        "principles": {"source": "file", "path": str(inputs["principles"]), "mode": "antithesis_all"},
        "generation": {"sampling": {"temperature": 1.0, "max_new_tokens": 12, "batch_size": 16},
                       "max_prompt_tokens": 256},
        "judge": {"backend": "openai", "model": "loopback-judge", "base_url": judge_url,
                  "api_key_env": "SAMI_EVAL_TEST_KEY", "retries": 1, "concurrency": 4},
        "win_rates": {"bootstrap": 500},
        "mtbench": {"enabled": True, "questions": str(tmp_path / "question.jsonl"),
                    "judge_prompts": str(tmp_path / "judge_prompts.jsonl"), "max_new_tokens": 8},
        "gsm8k": {"enabled": True, "source": str(tmp_path / "gsm8k.jsonl"), "num_samples": 3, "k": [1, 3],
                  "max_new_tokens": 8},
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_job(config: Path | None, *overrides, run: Path | None = None, timeout=420) -> subprocess.CompletedProcess:
    env = dict(os.environ, SAMI_EVAL_TEST_KEY="sk-eval-test-secret-123", RAY_AUTH_MODE="disabled")
    where = (["--config", str(config)] if config else []) + (["--run", str(run)] if run else [])
    return subprocess.run([sys.executable, "-m", "evals.run", *where, *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(480)
def test_evaluation_job_with_a_loopback_judge(tmp_path, tiny_model_dir):
    inputs = write_inputs(tmp_path, tiny_model_dir)
    server = ChatServer(judge_answer)
    try:
        config = eval_config(tmp_path, tiny_model_dir, inputs, server.url)
        done = run_job(config)
    finally:
        server.close()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "eval"
    for phase in ("phase 1/4: plan", "phase 2/4: generate", "phase 3/4: judge", "phase 4/4: report"):
        assert phase in done.stdout
    # The key went to the judge in the header and nowhere else.
    assert all(r["headers"].get("Authorization") == "Bearer sk-eval-test-secret-123" for r in server.requests)
    assert "sk-eval-test-secret-123" not in done.stdout + done.stderr
    assert not any("sk-eval-test" in p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file())
    # Ray's output is in the job's log file (checked for the key above), the console names it and has no cursor codes.
    assert f"log: {out / 'job.log'} (" in done.stdout and "\x1b[" not in done.stdout + done.stderr
    assert "Started a local Ray instance" in (out / "job.log").read_text()

    results = json.loads((out / "results.json").read_text())
    base, test = results["models"]["base"], results["models"]["sami-iter1"]
    assert base["win_rate_vs_baseline"] is None
    # Recompute the win rate from the saved responses with the judge's rule: the shorter response wins.
    responses = {name: [json.loads(l) for l in (out / "responses" / f"{name}.jsonl").read_text().splitlines()]
                 for name in ("base", "sami-iter1")}
    assert len(responses["base"]) == 20 and responses["base"][0]["constitution"].startswith("1. ")
    expected = [1.0 if len(t["response"]) < len(b["response"]) else 0.0 if len(t["response"]) > len(b["response"])
                else 0.5 for t, b in zip(responses["sami-iter1"], responses["base"])]
    win = test["win_rate_vs_baseline"]
    assert win["n"] == 20 and win["raw"]["win_rate"] == pytest.approx(sum(expected) / 20)
    assert win["unparsed"] == expected.count(0.5)
    for estimator in ("raw", "balanced", "logistic"):
        low, high = win[estimator]["ci"]
        assert 0 <= low <= win[estimator]["win_rate"] <= high <= 1
    judged = [json.loads(l) for l in (out / "judgments" / "sami-iter1-vs-base.jsonl").read_text().splitlines()]
    assert [j["score"] for j in judged] == expected
    assert all(j["passes"][0]["text"] for j in judged)  # what the judge wrote is kept
    # Both orders were used: the judge saw the test response in position A for some items and B for others.
    assert {j["passes"][0]["test_is_a"] for j in judged} == {True, False}
    assert base["mean_length"] == pytest.approx(sum(r["length_words"] for r in responses["base"]) / 20)

    mt = test["mtbench"]
    assert mt["single"]["turn_1"]["overall"] == {"n": 2, "unparsed": 0, "mean": 7.0}
    assert mt["pairwise"]["overall"]["mean"] == 0.5  # [[A]] in both orders: position bias cancels to a tie
    answers = [json.loads(l) for l in (out / "mtbench" / "model_answer" / "sami-iter1.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [81, 111] and all(len(a["choices"][0]["turns"]) == 2 for a in answers)
    math_prompts = [r["body"]["messages"][1]["content"] for r in server.requests
                    if r["body"]["messages"][0]["content"].startswith("Rate against the reference")]
    assert math_prompts and all("Ref: 5" in p for p in math_prompts)

    gsm = test["gsm8k"]
    assert gsm["n"] == 2 and gsm["n_samples"] == 3 and set(gsm["pass_at_k"]) == {"1", "3"}
    assert 0 <= gsm["pass_at_k"]["1"] <= gsm["pass_at_k"]["3"] <= 1

    report = (out / "report.md").read_text()
    assert "| sami-iter1 |" in report and "## MT-Bench" in report and "## GSM8K" in report
    for png in ("win_rates.png", "mi_bound.png", "lengths.png"):
        assert (out / png).stat().st_size > 5000 and f"]({png})" in report

    # A judge that answers the first request and then fails: the job stops, the previous results and config stay.
    previous = {name: (out / name).read_bytes() for name in ("results.json", "config.yaml")}
    failing = ChatServer(judge_answer, statuses=[200, 400])
    try:
        broken = run_job(config, f"judge.base_url={failing.url}", "--judge-only")
    finally:
        failing.close()
    assert broken.returncode == 2 and "HTTP 400" in broken.stderr and "Traceback" not in broken.stderr
    assert {name: (out / name).read_bytes() for name in previous} == previous
    # Judging again from the saved responses: nothing is generated, the figures are the same.
    server = ChatServer(judge_answer)
    try:
        again = run_job(config, f"judge.base_url={server.url}", "--judge-only")
    finally:
        server.close()
    assert again.returncode == 0, again.stderr[-3000:]
    assert "generate: skipped (--judge-only)" in again.stdout and "one Ray actor per model" not in again.stdout
    rejudged = json.loads((out / "results.json").read_text())["models"]
    assert rejudged["sami-iter1"]["win_rate_vs_baseline"]["raw"] == win["raw"]
    assert rejudged["sami-iter1"]["mi_lower_bound"] == test["mi_lower_bound"] and rejudged["sami-iter1"]["gsm8k"] == gsm


@pytest.mark.timeout(120)
def test_evaluation_job_reports_user_mistakes(tmp_path, tiny_model_dir):
    inputs = write_inputs(tmp_path, tiny_model_dir)
    config = eval_config(tmp_path, tiny_model_dir, inputs, "http://127.0.0.1:9/v1")
    bad = run_job(config, "baseline=nobody", "--dry-run")
    assert bad.returncode == 2 and "baseline 'nobody' is not one of the models" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = run_job(config, "data.path=/nonexistent/queries.jsonl", f"models.1.path={tmp_path}/no/such/hf")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "data.path: file not found: /nonexistent/queries.jsonl" in missing.stderr
    assert f"models.1.path: no such folder '{tmp_path}/no/such/hf'" in missing.stderr
    assert not (tmp_path / "eval").exists()  # refused before anything started
    ok = run_job(config, "--dry-run")
    assert ok.returncode == 0 and "2 model(s) against baseline 'base'" in ok.stdout
    assert "MT-Bench" in ok.stdout and "pass@[1, 3] from 3 samples" in ok.stdout


def test_local_hf_judge_and_rule_judge_share_the_interface(tiny_model_dir):
    from evals.config import JudgeConfig
    from evals.judges import make_judge
    from sami.constitutions import Constitution

    hf = make_judge(JudgeConfig(backend="hf", model=str(tiny_model_dir), max_tokens=6))
    assert hf.concurrency == 1  # one local model answers one request at a time
    items = [JudgeItem("Tell me about the river.", "1. Be concise.", "The river.", "The river is long and wide.")]
    (judged,) = hf.judgments(items)
    verdict = parse_final_answer(judged["text"])  # what the model wrote decides the score; unreadable is a tie
    assert judged == {"score": 0.5 if verdict is None else verdict, "parsed": verdict is not None, "text": judged["text"]}

    world = make_judge(JudgeConfig(backend="world"))
    concise = Constitution((("concise", True),))
    rows = [JudgeItem("q", "c", "the river is long.", "the river is long and wide and deep and old and slow and cold, "
                      "it runs to the sea past many towns and fields.", metadata={"constitution": concise, "subject": "river"})]
    assert world.compare(rows) == [1.0] and world.judgments(rows)[0] == {"score": 1.0, "parsed": True, "text": ""}


def test_vllm_engine_budget_and_gpus_come_from_the_benchmarks():
    from evals.config import EvalConfig
    from evals.generate import engine_model_config
    from sami.config import ConfigError, load_config

    cfg = EvalConfig(models=[{"name": "m", "path": "x"}], generation={"sampling": {"max_new_tokens": 350}},
                     gsm8k={"enabled": True, "max_new_tokens": 512})
    assert engine_model_config(cfg.models[0], cfg).max_response_tokens == 512  # not 350: vLLM would cut GSM8K
    with pytest.raises(ConfigError, match=r"generation.gpus_per_model \(8\) must equal generation.tensor_parallel_size \(4\)"):
        load_config(None, ["models=[{name: m, path: x}]", "generation.engine=vllm", "generation.tensor_parallel_size=4",
                           "generation.gpus_per_model=8"], model_cls=EvalConfig)


@pytest.mark.timeout(480)
def test_world_evaluation_reports_rule_adherence(tmp_path, tiny_model_dir):
    """configs/eval_world.yaml, smaller: the world's base model against a perturbed tiny model; adherence, the
    held-out principle, well-formed and the win rates agree with the world's rules on the saved responses."""
    from evals.config import EvalConfig
    from evals.plan import build_plan
    from sami.config import load_config
    from sami.world import rules

    trained = write_inputs(tmp_path, tiny_model_dir)["trained"]
    out = tmp_path / "eval-world"
    overrides = [f"run.output_dir={out}", "data.heldout_queries=18", "num_queries=12",
                 "adherence.heldout_principle_queries=6", "win_rates.bootstrap=200",
                 f"models=[{{name: base, path: 'builtin:world'}}, {{name: other, path: '{trained}'}}]"]
    done = run_job(REPO / "configs" / "eval_world.yaml", *overrides)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["heldout_principle_queries"] == 6 and results["meta"]["heldout_principles"] == ["exclaim"]
    plan = build_plan(load_config(out / "config.yaml", model_cls=EvalConfig))
    positive = [g.stated()[0] for g in plan.groups]
    scores = {}
    for name in ("base", "other"):
        m = results["models"][name]
        saved = [json.loads(l)["response"] for l in (out / "responses" / f"{name}.jsonl").read_text().splitlines()]
        extra = [json.loads(l)["response"] for l in
                 (out / "responses" / f"{name}.heldout-principle.jsonl").read_text().splitlines()]
        # the win rates judge the whole constitution; adherence is the six principles', the member's apart
        scores[name] = [rules.adherence_score(r, g.subject, c) for r, g, c in zip(saved, plan.groups, positive)]
        checks = [rules.adherence(r, g.subject, c) for r, g, c in zip(saved, plan.groups, positive)]
        six = [rules.share_followed({k: v for k, v in c.items() if not k.startswith("word-")}) for c in checks]
        member = [next(v for k, v in c.items() if k.startswith("word-")) for c in checks]
        a = m["adherence"]
        assert a["items"] == pytest.approx(six) and a["mean"] == pytest.approx(sum(six) / 12)
        # every other query states a held-out member: each family figure on those items alone
        assert [bool(set(c) & set(rules.HELDOUT_MEMBERS)) for c in checks] == [i % 2 == 1 for i in range(12)]
        held = m["family"]["heldout"]
        assert held["queries"] == 6 and held["adherence"] == pytest.approx(sum(member[1::2]) / 6)
        assert held["mi_lower_bound"] == pytest.approx(sum(m["mi_bounds"][1::2]) / 6)
        assert m["family"]["trained"]["adherence"] == pytest.approx(sum(member[0::2]) / 6)
        assert a["well_formed"] == pytest.approx(sum(map(rules.well_formed, saved)) / 12)
        assert a["heldout_principle"] == pytest.approx(sum(
            rules.adherence(r, g.subject, g.stated()[0])["exclaim"] for r, g in zip(extra, plan.heldout_principle)) / 6)
        assert set(a["per_principle"]) <= {p.name for p in rules.TRAINING_PRINCIPLES}
        assert len(m["mi_bounds"]) == 12 and m["mi_lower_bound"] == pytest.approx(sum(m["mi_bounds"]) / 12)
        judged = [json.loads(l) for l in (out / "judgments" / f"{name}-adherence.jsonl").read_text().splitlines()]
        assert [j["items"] for j in judged] == ["main"] * 12 + ["heldout_principle"] * 6
    assert results["models"]["base"]["adherence"]["mean"] > 0.3  # the world's base follows about half
    win = results["models"]["other"]["win_rate_vs_baseline"]
    assert win["scores"] == [1.0 if o > b else 0.0 if b > o else 0.5 for o, b in zip(scores["other"], scores["base"])]
    family = results["models"]["other"]["family"]
    assert family["heldout"]["win_rate"] == pytest.approx(sum(win["scores"][1::2]) / 6)
    assert results["models"]["base"]["family"]["heldout"]["win_rate"] is None  # the baseline is not judged
    assert "## Adherence (the world's rules)" in (out / "report.md").read_text()
    assert "## The colour family: trained and held-out members" in (out / "report.md").read_text()
    again = run_job(REPO / "configs" / "eval_world.yaml", *overrides, "--judge-only")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["models"]["other"]["adherence"] == results["models"]["other"]["adherence"]


def test_evaluating_a_run_folder_plans_from_its_config_and_refuses_what_is_not_one(tmp_path, capsys):
    """Fast: the plan --run makes of a folder laid out as training lays it out (exports faked, never loaded)."""
    from evals.run import main as eval_main
    from sami.config import dump_config, load_config
    from sami.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    assert eval_main(["--run", str(run.path), "--dry-run"]) == 2
    assert f"error: --run {run.path}: no config.yaml there, so not a pipelines.train run folder" in capsys.readouterr().err
    dump_config(load_config(REPO / "configs" / "tiny.yaml", [f"run.output_dir={run.path}"]), run.config)
    assert eval_main(["--run", str(run.path), "--dry-run"]) == 2
    assert "no complete iteration with an HF export yet (iterations complete: none" in capsys.readouterr().err
    for k, marker in ((1, "config.json"), (3, "adapter_config.json")):  # iteration 2 is incomplete: not evaluated
        run.hf(k).mkdir(parents=True)  # iteration 3 as a LoRA run exports it: the adapter (served on its base)
        (run.hf(k) / marker).write_text("{}")
        run.complete(k).write_text("ok\n")
    run.hf(2).mkdir(parents=True)
    assert eval_main(["--run", str(run.path), "--dry-run", "num_queries=5"]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert plan[:4] == [f"evaluation eval-tiny: 3 model(s) against baseline 'base' -> {run.evaluation}",
                        "  model base: builtin:world-small", f"  model iteration-1: {run.hf(1)}",
                        f"  model iteration-3: {run.hf(3)}"]
    assert plan[4] == "  queries: the built-in world, the last 32 queries training held out, at most 5; 2 constitutions each (sample_k)"
    assert "judge: the world's rule judge" in plan[6] and "the world's rule adherence" in plan[7]
