"""Queries for the training job: from the hub (`datasets.load_dataset`), a local JSONL file, or the world.

Every source yields rows `{"query_id": str, "query": str, "subject": str}` (`subject` is only meaningful in
the built-in world, whose judge needs it). Held-out queries are cut off first, so the evaluation job can
use exactly the queries training never saw.
"""
from __future__ import annotations

import random
from pathlib import Path

from sami.config import ConfigError, DataConfig
from sami.jsonl import JSONLError, numbered_jsonl

WORLD_QUERIES = 1024  # the built-in world's training queries when data.max_queries is not set


def first_human_turn(dialogue: str) -> str:
    """HH-RLHF stores whole dialogues ("\n\nHuman: ... \n\nAssistant: ..."); SAMI uses the first query."""
    text = dialogue.split("Human:", 1)[-1]
    return text.split("\n\nAssistant:", 1)[0].strip()


def _rows_from_records(records, cfg: DataConfig, where) -> list[dict]:
    """`where(index)` names a record for an error: the file and line of a JSONL file, the data set's record."""
    rows, seen = [], set()
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ConfigError(f"{where(index)}: expected a JSON object with a query, got {record!r}"[:300])
        if cfg.query_field:
            if cfg.query_field not in record:
                raise ConfigError(f"data.query_field {cfg.query_field!r} is not a field of record {index} "
                                  f"(fields: {sorted(record)})")
            query, key = record[cfg.query_field], str(record.get("id", index))
        elif cfg.task == "dialogue" and "chosen" in record:  # Anthropic/hh-rlhf
            query, key = first_human_turn(record["chosen"]), str(index)
        elif cfg.task == "summarization" and "info" in record:  # openai/summarize_from_feedback
            query, key = record["info"]["post"], str(record["info"]["id"])
        elif "query" in record:
            query, key = record["query"], str(record.get("id", index))
        else:
            raise ConfigError(f"record {index} has no query: set data.query_field (fields: {sorted(record)})")
        check_query(query, where(index))
        if key in seen:  # TL;DR has several comparisons per post: dedupe by post id
            continue
        seen.add(key)
        rows.append({"query_id": key, "query": query.strip(), "subject": record.get("subject", "")})
    return rows


def check_query(query, where: str) -> None:
    """A query is text to train on: never null, a number (trained on as "None" or "12345"), blank (dropped
    unseen) or a lone surrogate (no UTF-8 for the tokenizer)."""
    if not isinstance(query, str):
        raise ConfigError(f"{where}: the query is {type(query).__name__} {query!r}, not text"[:300])
    if not query.strip():
        raise ConfigError(f"{where}: the query is empty")
    try:
        query.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"{where}: the query holds a lone surrogate ({query[e.start]!r} at character {e.start})") from None


def load_queries(cfg: DataConfig, seed: int) -> list[dict]:
    if cfg.source == "world":
        from sami.world.grammar import sample_query

        rng = random.Random(f"world-queries-{seed}")
        n = cfg.max_queries or WORLD_QUERIES
        return [{"query_id": f"w{i}", "query": q.text, "subject": q.subject} for i, q in
                ((i, sample_query(rng)) for i in range(n + cfg.heldout_queries))]
    if cfg.source == "jsonl":
        path = Path(cfg.path)
        if not path.is_file():
            raise ConfigError(f"data.path: file not found: {path}")
        try:
            numbered = numbered_jsonl(path)
        except JSONLError as e:
            raise ConfigError(f"data.path {e}") from None
        records = [record for _, record in numbered]

        def where(index: int) -> str:
            return f"data.path {path}: line {numbered[index][0]}"
    else:
        import datasets

        try:
            records = datasets.load_dataset(cfg.dataset, cfg.subset, split=cfg.split)
        except Exception as e:  # the hub or a local path: either way the user's setting is what failed
            raise ConfigError(f"data.dataset {cfg.dataset!r} (subset {cfg.subset!r}, split {cfg.split!r}) "
                              f"could not be loaded: {e}") from None

        def where(index: int) -> str:
            return f"data.dataset {cfg.dataset!r} (split {cfg.split!r}): record {index}"
    rows = _rows_from_records(records, cfg, where)
    if not rows:
        raise ConfigError(f"no queries found in {cfg.path or cfg.dataset}")
    limit = (cfg.max_queries or len(rows)) + cfg.heldout_queries
    return rows[:limit]


def split_queries(rows: list[dict], heldout: int) -> tuple[list[dict], list[dict]]:
    """(training queries, held-out queries): the held-out ones are the last `heldout` rows."""
    if heldout >= len(rows):
        raise ConfigError(f"data.heldout_queries ({heldout}) leaves no training queries out of {len(rows)}")
    return rows[: len(rows) - heldout], rows[len(rows) - heldout :]


def iteration_queries(train_rows: list[dict], iteration: int, count: int, alternate_splits: bool) -> list[dict]:
    """The queries iteration k (1-based) generates for: consecutive chunks, wrapping around the pool.

    With `alternate_splits`, odd iterations draw from the first half and even ones from the second, so a
    model never trains on queries it generated responses for in the previous iteration (the paper's scheme).
    """
    pool = train_rows
    if alternate_splits:
        half = len(train_rows) // 2
        pool = train_rows[:half] if iteration % 2 == 1 else train_rows[half:]
        iteration = (iteration + 1) // 2
    start = (iteration - 1) * count
    return [pool[(start + i) % len(pool)] for i in range(min(count, len(pool)))]
