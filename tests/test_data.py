"""Query loading and the per-iteration query schedule (Ray-free)."""
import json

import pytest

from sami.config import ConfigError, DataConfig
from sami.data import first_human_turn, iteration_queries, load_queries, split_queries


def rows(n: int) -> list[dict]:
    return [{"query_id": str(i), "query": f"q{i}"} for i in range(n)]


def test_jsonl_queries_dedupe_and_hh_first_turn(tmp_path):
    path = tmp_path / "q.jsonl"
    records = [{"id": "a", "query": " Tell me about rivers. "}, {"id": "a", "query": "duplicate id"},
               {"id": "c", "query": "Name a mountain."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    loaded = load_queries(DataConfig(source="jsonl", path=str(path), task="dialogue"), seed=0)
    assert [(r["query_id"], r["query"]) for r in loaded] == [("a", "Tell me about rivers."), ("c", "Name a mountain.")]
    assert first_human_turn("\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour.") == "How do I bake bread?"


def test_jsonl_errors_name_the_field_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "fine"}\nnot json\n')
    with pytest.raises(ConfigError, match="bad.jsonl line 2: not valid JSON"):
        load_queries(DataConfig(source="jsonl", path=str(path)), seed=0)
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(ConfigError, match="data.query_field 'text' is not a field of record 0"):
        load_queries(DataConfig(source="jsonl", path=str(path), query_field="text"), seed=0)
    with pytest.raises(ConfigError, match="file not found"):
        load_queries(DataConfig(source="jsonl", path=str(tmp_path / "missing.jsonl")), seed=0)


@pytest.mark.parametrize("line, problem", [
    (b'{"query": "   "}', "line 2: the query is empty"),  # was dropped unseen
    (b'{"query": null}', "line 2: the query is NoneType None, not text"),  # was trained on as "None"
    (b'{"query": 12345}', "line 2: the query is int 12345, not text"),  # was trained on as "12345"
    (b'{"query": "\\ud800 lone"}', "line 2: the query holds a lone surrogate"),
    (b'{"query": "caf\xe9"}', "line 2: not UTF-8 (byte 0xe9 at column 15)"),  # was a UnicodeDecodeError traceback
])
def test_a_query_that_is_not_text_is_refused_with_its_file_and_line(tmp_path, line, problem):
    path = tmp_path / "q.jsonl"
    path.write_bytes(b'{"query": "fine"}\n' + line + b"\n")
    with pytest.raises(ConfigError) as refused:
        load_queries(DataConfig(source="jsonl", path=str(path)), seed=0)
    assert str(refused.value).startswith(f"data.path {path}") and problem in str(refused.value), str(refused.value)


def test_world_queries_are_seeded_and_heldout_comes_last():
    cfg = DataConfig(source="world", max_queries=10, heldout_queries=3)
    first, again, other = load_queries(cfg, 0), load_queries(cfg, 0), load_queries(cfg, 1)
    assert len(first) == 13 and first == again and first != other
    train, held = split_queries(first, 3)
    assert train == first[:10] and held == first[10:]
    with pytest.raises(ConfigError, match="leaves no training queries"):
        split_queries(first, 13)


def test_iteration_queries_walk_the_pool_and_wrap():
    pool = rows(10)
    assert [r["query_id"] for r in iteration_queries(pool, 1, 4, False)] == ["0", "1", "2", "3"]
    assert [r["query_id"] for r in iteration_queries(pool, 3, 4, False)] == ["8", "9", "0", "1"]
    assert len(iteration_queries(pool, 1, 50, False)) == 10  # never more than the pool holds


def test_alternate_splits_never_reuse_the_previous_iterations_queries():
    pool = rows(8)
    ids = {k: [r["query_id"] for r in iteration_queries(pool, k, 2, True)] for k in (1, 2, 3, 4)}
    assert ids == {1: ["0", "1"], 2: ["4", "5"], 3: ["2", "3"], 4: ["6", "7"]}
    for k in (1, 2, 3):
        assert not set(ids[k]) & set(ids[k + 1])
