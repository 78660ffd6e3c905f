"""The query-group stages and the training job's generation phase, with a fake writer and a fake engine (no Ray).

The fakes stand in for the principle-writer actor and the rollout actors, which need a Ray cluster; the code
between them (planning, batching, seeding, filtering, tokenising, ordering) is the production code.
"""
import json
import random

import pyarrow as pa
import pyarrow.parquet
import pytest
from transformers import AutoTokenizer

from pipelines.loop import build_groups, equal_shards, replay_groups
from sami.config import FilterConfig, load_config
from sami.constitutions import sample_constitutions
from sami.groups import QueryGroup, TrainingSeeds, attach_completions, filter_and_tokenise, plan_groups, tokenise_pairs
from sami.prompts import training_prompt
from sami.run_dir import RunDir
from sami.world.rules import PRINCIPLES

QUERIES = [{"query_id": f"w{i}", "query": f"Tell me about the river {i}.", "subject": "river"} for i in range(6)]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def fake_writer(ids, seed):
    """What PrincipleWriterCore.iteration_constitutions returns for the world: the library and C=2 each."""
    return PRINCIPLES, [sample_constitutions(PRINCIPLES, 2, "sample_k", random.Random(f"{seed}/{q}"), k=3,
                                             heldout=("exclaim",)) for q in ids]


def completion(text):
    return {"text": text, "token_ids": list(range(len(text.split()))), "finish_reason": "stop", "end_id": 2}


def test_plan_attach_filter_tokenise(tokenizer):
    library, stances = fake_writer([q["query_id"] for q in QUERIES], 7)
    groups = plan_groups(QUERIES, library, stances, "world", TrainingSeeds(seed=0, iteration=1))
    assert [len(g.generation_prompts) for g in groups] == [2] * 6
    assert groups[0].stances == json.dumps([list(map(list, c.stances)) for c in stances[0]])
    assert all("exclaim" not in g.stances for g in groups)  # the held-out principle is never stated
    texts = ["the river is long.", "the river is wide.", "", "the river.", "same.", "same.",
             "Human: leak", "ok.", "a.", "b.", "c.", "d."]
    attach_completions(groups, [completion(t) for t in texts])
    assert groups[0].responses == ["the river is long.", "the river is wide."] and groups[0].response_tokens == 4.0
    with pytest.raises(ValueError, match="11 completions for 12"):
        attach_completions(groups, [completion("x")] * 11)
    kept, counts = filter_and_tokenise(groups, tokenizer, FilterConfig(), "world", 16, 3)
    assert counts == {"filtered_empty": 1, "filtered_format_leak": 1, "filtered_malformed": 0, "filtered_identical": 1}
    assert [g.query_id for g in kept] == ["w0", "w4", "w5"]
    g = kept[0]
    expected = tokenise_pairs(tokenizer, [training_prompt("world", c, g.query) for c in g.constitutions], g.responses, 16, 3)
    assert g.prompt_ids == expected[0]
    # the responses are the ids the engine sampled (with the stop token it sampled), cut to 3 tokens and EOS
    assert g.response_ids == [[0, 1, 2, tokenizer.eos_token_id]] * 2
    assert all(len(p) <= 16 for p in g.prompt_ids) and all(len(r) <= 4 and r[-1] == tokenizer.eos_token_id for r in g.response_ids)


def test_tokenise_pairs_keeps_the_prompt_end_and_appends_eos(tokenizer):
    full_p, full_r = tokenise_pairs(tokenizer, ["Query: Tell me about the river."], ["the river is long and wide."])
    cut_p, cut_r = tokenise_pairs(tokenizer, ["Query: Tell me about the river."], ["the river is long and wide."], 3, 2)
    assert cut_p[0] == full_p[0][-3:] and cut_r[0] == full_r[0][:2] + [tokenizer.eos_token_id]
    assert full_r[0][0] == tokenizer(" the", add_special_tokens=False).input_ids[0]  # the leading space


def test_generation_phase_batches_seeds_and_orders(tokenizer):
    cfg = load_config(None, ["sampling.batch_size=4", "model.max_prompt_tokens=64", "model.max_response_tokens=8",
                             "principles.mode=sample_k", "principles.principles_per_constitution=3"])
    calls = []

    def fake_engines(batches, seeds):
        calls.append((batches, seeds))
        # A response that depends on the prompt, so groups are distinct and well formed.
        return [completion(f"the river {len(p) % 97} is long.") for b in batches for p in b]

    kept, figures = build_groups(cfg, 2, QUERIES, fake_writer, fake_engines, tokenizer)
    (batches, seeds), = calls
    assert [len(b) for b in batches] == [4, 4, 4]  # 2 groups x C=2 prompts per batch
    again, _ = build_groups(cfg, 2, QUERIES, fake_writer, lambda b, s: calls.append((b, s)) or fake_engines(b, s), tokenizer)
    assert calls[1][1] == seeds  # seeds depend on the queries, not on arrival
    assert [len(s) for s in seeds] == [4, 4, 4] and len({s for batch in seeds for s in batch}) == 12  # one per prompt
    # a prompt's seed is its query's and constitution's, whatever batch it travels in
    wider = load_config(None, ["sampling.batch_size=6", "model.max_prompt_tokens=64", "model.max_response_tokens=8",
                               "principles.mode=sample_k", "principles.principles_per_constitution=3"])
    build_groups(wider, 2, QUERIES, fake_writer, fake_engines, tokenizer)
    assert [s for batch in calls[-1][1] for s in batch] == [s for batch in seeds for s in batch]
    assert [len(b) for b in calls[-1][0]] == [6, 6]
    assert [g.query_id for g in kept] == [q["query_id"] for q in QUERIES if q["query_id"] in {g.query_id for g in kept}]
    assert [g.record() for g in kept] == [g.record() for g in again]
    assert figures["filtered_identical"] + len(kept) == len(QUERIES)


def test_groups_parquet_round_trip_and_shards(tmp_path, tokenizer):
    library, stances = fake_writer([q["query_id"] for q in QUERIES], 0)
    groups = plan_groups(QUERIES, library, stances, "world", TrainingSeeds(0, 1))
    attach_completions(groups, [completion(f"the river is {i}.") for i in range(12)])
    kept, _ = filter_and_tokenise(groups, tokenizer, FilterConfig(), "world", 64, 8)
    (tmp_path / "iteration-1").mkdir()
    pyarrow.parquet.write_table(pa.Table.from_pylist([g.record() for g in kept]), tmp_path / "iteration-1" / "groups.parquet")
    # the rows as Arrow hands them back (a replay run reads them through Ray Data: test_training_loop.py)
    replayed = [QueryGroup.from_record(row) for row in pyarrow.parquet.read_table(tmp_path / "iteration-1" / "groups.parquet").to_pylist()]
    assert [g.record() for g in replayed] == [g.record() for g in kept]
    assert isinstance(replayed[0].prompt_ids[0][0], int)
    with pytest.raises(FileNotFoundError, match="did that run reach iteration 2"):
        replay_groups(RunDir(tmp_path), 2)
    shards = equal_shards(kept[:5], 2)
    assert [[g.query_id for g in s] for s in shards] == [["w0", "w1"], ["w2", "w3"]]


def test_shuffled_pairs_keep_every_response_once_and_break_the_pairing():
    from sami.groups import shuffle_pairs

    groups = [QueryGroup(query_id=f"q{i}", query="", responses=[f"r{i}.0", f"r{i}.1"],
                         response_ids=[[i, 0], [i, 1]], constitutions=["c0", "c1"]) for i in range(50)]
    shuffled = shuffle_pairs([QueryGroup(**vars(g)) for g in groups], random.Random(0))
    moved = [(g.query_id, j, r, ids) for g in shuffled for j, (r, ids) in enumerate(zip(g.responses, g.response_ids))]
    # each response once, with its own tokens; the prompts stay where they were
    assert sorted(r for *_, r, _ in moved) == sorted(r for g in groups for r in g.responses)
    assert all(ids == [int(r[1:].split(".")[0]), int(r.split(".")[1])] for *_, r, ids in moved)
    assert all(g.constitutions == ["c0", "c1"] for g in shuffled)
    in_place = sum(r == f"r{q[1:]}.{j}" for q, j, r, _ in moved)
    assert in_place <= 5  # of 100: a random slot is its own 1 time in 100
    again = shuffle_pairs([QueryGroup(**vars(g)) for g in groups], random.Random(0))
    assert [g.responses for g in again] == [g.responses for g in shuffled]
