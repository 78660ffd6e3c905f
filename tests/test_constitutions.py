"""Principle libraries, constitution sampling and rendering, prompt templates."""
import random

import pytest

from sami.constitutions import Constitution, render_constitution, sample_constitutions
from sami.principles import Principle, PrincipleError, load_principles, save_principles
from sami.prompts import generation_prompt, training_prompt

LIB = [Principle(n, f"Be {n}.", f"Never be {n}.") for n in ("kind", "brief", "exact", "calm")]


def test_repo_libraries_load():
    for name in ("hh", "tldr"):
        assert len(load_principles(f"configs/principles/{name}.yaml")) >= 2


@pytest.mark.parametrize(
    "body, message",
    [
        ("- {name: a, definition: x}", "principle #1 ('a'): missing 'antithesis'"),
        ("- {name: a, definition: x, antithesis: y}\n- {name: a, definition: z, antithesis: w}", "principle #2 ('a'): duplicate name 'a'"),
        ("- {name: a, definition: '  ', antithesis: y}", "'definition' must be non-empty text"),
        ("- {name: a, definition: x, antithesis: y, weight: 2}", "unknown key(s) ['weight']"),
        ("[]", "non-empty list"),
        ("- [1, 2]", "expected a mapping"),
    ],
)
def test_bad_libraries_name_file_and_entry(tmp_path, body, message):
    path = tmp_path / "lib.yaml"
    path.write_text(body)
    with pytest.raises(PrincipleError) as err:
        load_principles(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_json_and_round_trip(tmp_path):
    (tmp_path / "lib.json").write_text('{"principles": [{"name": "a", "definition": "x", "antithesis": "y"}]}')
    assert load_principles(tmp_path / "lib.json") == [Principle("a", "x", "y")]
    save_principles(LIB, tmp_path / "saved.yaml")
    assert load_principles(tmp_path / "saved.yaml") == LIB
    with pytest.raises(PrincipleError, match="not found"):
        load_principles(tmp_path / "missing.yaml")


def test_antithesis_all_flips_everything_and_positive_comes_first():
    pos, neg = sample_constitutions(LIB, 2, "antithesis_all", random.Random(0))
    assert pos.is_fully_positive and len(pos.stances) == 4
    assert not any(p for _, p in neg.stances)
    with pytest.raises(ValueError, match="C must be 2"):
        sample_constitutions(LIB, 3, "antithesis_all", random.Random(0))


def test_antithesis_one_flips_distinct_single_principles_and_respects_heldout():
    cons = sample_constitutions(LIB, 4, "antithesis_one", random.Random(3), heldout=["calm"])
    assert cons[0].is_fully_positive
    flipped = [[n for n, p in c.stances if not p] for c in cons[1:]]
    assert all(len(f) == 1 for f in flipped) and len({f[0] for f in flipped}) == 3
    assert all("calm" not in dict(c.stances) for c in cons)
    with pytest.raises(ValueError, match="cannot make 4 contrasts"):
        sample_constitutions(LIB, 5, "antithesis_one", random.Random(0), heldout=["calm"])
    with pytest.raises(ValueError, match="not in the library"):
        sample_constitutions(LIB, 2, "antithesis_one", random.Random(0), heldout=["nope"])


def test_sample_k_is_deterministic_under_seed_and_contrasts_are_distinct():
    draws = [sample_constitutions(LIB, 3, "sample_k", random.Random(7), k=2) for _ in range(2)]
    assert draws[0] == draws[1]
    cons = draws[0]
    assert len(cons[0].stances) == 2 and cons[0].is_fully_positive
    assert len({c.stances for c in cons}) == 3
    assert {n for c in cons for n, _ in c.stances} == {n for n, _ in cons[0].stances}
    seen = {n for seed in range(50) for n, _ in sample_constitutions(LIB, 2, "sample_k", random.Random(seed), k=2, heldout=["kind"])[0].stances}
    assert seen == {"brief", "exact", "calm"}
    with pytest.raises(ValueError, match="only 3 distinct contrasts"):
        sample_constitutions(LIB, 5, "sample_k", random.Random(0), k=2)


def test_a_family_adds_one_member_per_query_flipped_with_the_others():
    family = [Principle(f"word-{c}", f"Mention {c}.", f"Never use {c}.") for c in ("red", "blue", "pink")]
    library = LIB + family
    seen = set()
    for seed in range(60):
        cons = sample_constitutions(library, 2, "sample_k_antithesis_all", random.Random(seed), k=2,
                                    heldout=["word-pink"], family=["word-red", "word-blue"])
        names = [n for n, _ in cons[0].stances]
        members = [n for n in names if n.startswith("word-")]
        assert len(names) == 3 and len(members) == 1 and cons[1].stances == tuple((n, False) for n in names)
        assert all(positive for _, positive in cons[0].stances)
        seen.update(members)
    assert seen == {"word-red", "word-blue"}  # never the held-out member, never two
    one = sample_constitutions(library, 3, "antithesis_one", random.Random(0), heldout=["word-pink", "word-blue"],
                               family=["word-red"])
    assert {n for n, _ in one[0].stances} == {"kind", "brief", "exact", "calm", "word-red"}
    with pytest.raises(ValueError, match=r"family member\(s\) \['word-pink'\] are held out"):
        sample_constitutions(library, 2, "antithesis_all", random.Random(0), heldout=["word-pink"], family=["word-pink"])


def test_render_shuffles_order_but_not_content():
    library = {p.name: p for p in LIB}
    con = Constitution((("brief", False), ("calm", True), ("exact", True), ("kind", True)))
    texts = {render_constitution(con, library, random.Random(s)) for s in range(20)}
    assert len(texts) > 1
    for text in texts:
        lines = text.splitlines()
        assert [line.split(". ", 1)[0] for line in lines] == ["1", "2", "3", "4"]
        assert sorted(line.split(". ", 1)[1] for line in lines) == sorted(["Never be brief.", "Be calm.", "Be exact.", "Be kind."])
    assert render_constitution(con, library, random.Random(1)) == render_constitution(con, library, random.Random(1))


def test_prompt_templates():
    gen = generation_prompt("dialogue", "1. Be kind.", "How do I bake bread?")
    train = training_prompt("dialogue", "1. Be kind.", "How do I bake bread?")
    assert "### Example Format" in gen and "### Example Format" not in train
    assert train.endswith("Human: How do I bake bread?\n\nAssistant:") and "1. Be kind." in train
    assert training_prompt("summarization", "c", "post").endswith("POST: post\n\nTL;DR:")
    assert generation_prompt("world", "c", "q") == training_prompt("world", "c", "q") == "Constitution:\nc\n\nQuery: q\nResponse:"
    with pytest.raises(ValueError, match="unknown task"):
        training_prompt("poetry", "c", "q")
