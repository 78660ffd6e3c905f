"""The built-in world: the rule judge on hand-written responses, a grammar that agrees with the judge, a corpus
that follows at p_follow, the held-out principle and colour-family members, and the cached base model."""
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from sami.config import load_config
from sami.constitutions import Constitution
from sami.world import grammar, rules
from sami.world.base_model import BaseModelSpec, ensure_base_model, spec_hash

REPO = Path(__file__).resolve().parents[1]

# (principle, a response with the definition's property, one with the antithesis's), subject "river"
HAND_WRITTEN = [
    ("concise", "the river is calm.", "the river is calm and it feels warm and green to most people."),
    ("polite", "please, the river is calm.", "the river is calm."),
    ("subject", "the river is calm.", "this place is calm."),
    ("number", "the river is calm with 12 boats.", "the river is calm with many boats."),
    ("exclaim", "the river is calm!", "the river is calm."),
    ("lowercase", "the river is calm.", "The River Is Calm."),
    ("word-red", "the river is red and calm.", "the river is blue and calm."),
    ("word-pink", "The River Is Pink And Calm.", "The River Is Calm."),
]


@pytest.mark.parametrize("name, positive, negative", HAND_WRITTEN)
def test_rule_judge_on_hand_written_responses(name, positive, negative):
    assert rules.satisfies(positive, "river", name, True) and not rules.satisfies(positive, "river", name, False)
    assert rules.satisfies(negative, "river", name, False) and not rules.satisfies(negative, "river", name, True)
    assert rules.well_formed(positive) and rules.well_formed(negative)


def test_adherence_and_the_pairwise_judge():
    con = Constitution((("concise", True), ("number", True), ("polite", False)))
    # concise yes, number no, curt yes: 2 of 3
    assert rules.adherence("the river is calm.", "river", con) == {"concise": True, "number": False, "polite": True}
    assert rules.adherence_score("the river is calm.", "river", con) == pytest.approx(2 / 3)
    assert rules.adherence_score("the river is calm with 3 boats.", "river", con) == 1.0
    # Gibberish follows nothing, not even "use no digits" or "be curt".
    assert not rules.well_formed("river river . calm ! the") and rules.adherence_score("river river . calm ! the", "river", con) == 0.0

    def item(a, b):
        return SimpleNamespace(response_a=a, response_b=b, metadata={"constitution": con, "subject": "river"})

    judge = rules.WorldJudge()
    assert judge.compare([item("the river is calm with 3 boats.", "the river is calm."),
                          item("the river is calm.", "the river is calm with 3 boats."),
                          item("the river is calm.", "the lake is old.")]) == [1.0, 0.0, 0.5]


def test_rendered_responses_have_exactly_their_attributes():
    rng = random.Random(0)
    for _ in range(300):
        subject, colour = rng.choice(grammar.SUBJECTS), rng.choice([None, *rules.COLOURS])
        attrs = {p.name: rng.random() < 0.5 for p in rules.PRINCIPLES}
        attrs.update({rules.member_name(c): c == colour for c in rules.COLOURS})
        text = grammar.render_response(attrs, subject, rng, colour)
        assert rules.well_formed(text), text
        for name, value in attrs.items():
            assert rules.satisfies(text, subject, name, value) and not rules.satisfies(text, subject, name, not value), (name, text)


@pytest.mark.parametrize("p_follow", [0.6, 1.0])
def test_corpus_follows_its_constitutions_at_p_follow(p_follow):
    rng = random.Random(1)
    followed = {p.name: [] for p in rules.PRINCIPLES + rules.FAMILY}
    for _ in range(6000):
        query, con, response = grammar.corpus_sample(rng, p_follow)
        assert len(set(dict(con.stances)) & {p.name for p in rules.FAMILY}) == 1  # every document states one member
        for name, ok in rules.adherence(response, query.subject, con).items():
            followed[name].append(ok)
    rates = {name: sum(v) / len(v) for name, v in followed.items()}
    overall = sum(sum(v) for v in followed.values()) / sum(len(v) for v in followed.values())
    assert overall == pytest.approx(p_follow, abs=0.02)
    # held-out members too: the base model has seen them
    assert all(rate == pytest.approx(p_follow, abs=0.05) for rate in rates.values()), rates


def test_corpus_documents_are_in_the_training_prompt_format():
    prompt, response = grammar.corpus_document(random.Random(2), 0.6)
    assert prompt.startswith("Constitution:\n1. ") and "\n\nQuery: " in prompt and prompt.endswith("Response:")
    assert rules.well_formed(response)


def test_held_out_principle_and_evaluation_queries():
    from evals.config import EvalConfig
    from evals.plan import build_plan
    from sami.config import ConfigError, build_config, load_yaml
    from sami.data import load_queries

    assert rules.HELDOUT_PRINCIPLES == ("exclaim",)
    assert "exclaim" not in {p.name for p in rules.TRAINING_PRINCIPLES} and len(rules.TRAINING_PRINCIPLES) == 5

    def plan(seed: int, *overrides):
        cfg = build_config(EvalConfig, load_yaml(REPO / "configs" / "eval_world.yaml"),
                           [f"run.seed={seed}", "data.heldout_queries=75", "num_queries=50",
                            "adherence.heldout_principle_queries=25", *overrides], "eval_world.yaml")
        return build_plan(cfg)

    p = plan(0)
    extra = p.heldout_principle
    assert len(p.groups) == 50 and len(extra) == 25
    assert all("exclaim" not in dict(c.stances) for g in p.groups for c in g.stated())
    # 3 principles and one trained member; the exclaim queries' member is a trained one
    trained, held = {f"word-{c}" for c in ("red", "blue", "yellow", "purple", "orange")}, set(rules.HELDOUT_MEMBERS)
    assert all(dict(c.stances).get("exclaim") is True and len(c.stances) == 4 and all(dict(c.stances).values())
               and len(dict(c.stances).keys() & trained) == 1 for g in extra for c in g.stated())
    # the evaluation's queries state a trained member and a held-out one in turn, the same in both constitutions
    members = [[set(dict(c.stances)) & (trained | held) for c in g.stated()] for g in p.groups]
    assert all(len(m[0]) == 1 and m[0] == m[1] for m in members)
    assert [bool(m[0] & held) for m in members] == [i % 2 == 1 for i in range(50)]
    # Queries training never saw, none shared between the two sets.
    train = load_config(REPO / "configs" / "world_demo.yaml")
    seen = {r["query_id"] for r in load_queries(train.data, 0)}
    assert not seen & {g.query_id for g in p.groups + extra}
    assert not {g.query_id for g in p.groups} & {g.query_id for g in extra}
    def prompts(p):
        return [g.generation_prompts for g in p.heldout_principle]

    assert prompts(plan(0)) == prompts(p) and prompts(plan(1)) != prompts(p)
    with pytest.raises(ConfigError, match=r"needs 50 \+ 25 held-out queries, there are 60"):
        plan(0, "data.heldout_queries=60")


@pytest.mark.timeout(300)
def test_base_model_is_built_once_then_reused(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sami.world import base_model

    monkeypatch.setenv("SAMI_CACHE_DIR", str(tmp_path))
    pretrained_on = []

    def recording(*args, **kwargs):  # the real pretraining, and the threads it ran on
        pretrained_on.append(torch.get_num_threads())
        return pretrain(*args, **kwargs)

    pretrain = base_model.pretrain
    monkeypatch.setattr(base_model, "pretrain", recording)
    spec = BaseModelSpec(num_docs=200, steps=5, batch_size=8)
    messages = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a job driver's count
    try:
        path = ensure_base_model(spec, log=messages.append)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert pretrained_on == [base_model.PRETRAIN_THREADS]
    assert path == tmp_path / "world" / f"base-{spec_hash(spec)}" and (path / "READY").is_file()
    assert any("pretraining the base model" in m for m in messages)
    weights = next(path.glob("*.safetensors"))
    mtime = weights.stat().st_mtime_ns
    messages.clear()
    assert ensure_base_model(spec, log=messages.append) == path
    assert messages == [f"[world] reusing cached base model {path}"] and weights.stat().st_mtime_ns == mtime
    other = BaseModelSpec(num_docs=200, steps=5, batch_size=8, seed=1)
    assert spec_hash(other) != spec_hash(spec)
    torch.set_num_threads(3)  # built by a caller with 1 thread, reused by one with another count
    try:
        assert ensure_base_model(spec, log=messages.append) == path and len(pretrained_on) == 1
    finally:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("Constitution:\n1. Be polite.", add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids and model(torch.tensor([ids])).logits.shape[-1] >= len(tokenizer)


def test_the_demo_filter_pattern_is_the_judges_format_check():
    pattern = load_config(REPO / "configs" / "world_demo.yaml").filters.response_pattern
    rng = random.Random(3)
    texts = []
    for _ in range(300):
        t = grammar.render_response({p.name: rng.random() < 0.5 for p in rules.PRINCIPLES}, rng.choice(grammar.SUBJECTS), rng)
        texts += [t, t[:-1], t + " the end.", t.replace("is", "<unk>"), "Response: " + t, t + "!"]
    texts += ["a b.", " ".join(["word"] * 31) + ".", " ".join(["word"] * 30) + "!", "it's 12 o'clock, thanks!"]
    agree = [bool(re.fullmatch(pattern, t.strip())) == rules.well_formed(t) for t in texts]
    assert all(agree) and 0.2 < sum(map(rules.well_formed, texts)) / len(texts) < 0.8
