"""The data stages of one iteration, run through Ray Data; one row is one query group.

queries -> constitutions (from the principle writer) -> responses (from the rollout actors) -> filter
-> tokenised C x C training sequences. Each stage is a plain function on a pandas batch so a unit test
can call it without Ray.
"""
from __future__ import annotations

import functools
import json
import random
import zlib
from pathlib import Path

import pandas as pd
import pyarrow.parquet
import ray

from pipelines.config import TrainConfig
from pipelines.constitutions import Constitution, render_constitution
from pipelines.filters import REASONS, reject_reason
from pipelines.prompts import generation_prompt, training_prompt


def row_rng(seed: int, iteration: int, query_id: str, purpose: str) -> random.Random:
    return random.Random(f"{seed}/{iteration}/{query_id}/{purpose}")


def add_constitutions(batch: pd.DataFrame, writer, cfg: TrainConfig, iteration: int) -> pd.DataFrame:
    """C constitutions per query, rendered twice: in the generation prompt and, reshuffled, in the training prompt."""
    library = {p.name: p for p in ray.get(writer.principles.remote())}
    stances = ray.get(writer.constitutions.remote(list(batch["query_id"]), cfg.run.seed * 1000 + iteration))
    gen_prompts, train_texts, stance_json = [], [], []
    for query_id, query, cons in zip(batch["query_id"], batch["query"], stances):
        rng_gen, rng_train = (row_rng(cfg.run.seed, iteration, query_id, p) for p in ("generation", "training"))
        gen_prompts.append([generation_prompt(cfg.data.task, render_constitution(c, library, rng_gen), query) for c in cons])
        train_texts.append([render_constitution(c, library, rng_train) for c in cons])
        stance_json.append(json.dumps([list(map(list, c.stances)) for c in cons]))
    return batch.assign(generation_prompts=gen_prompts, constitutions=train_texts, stances=stance_json)


def add_responses(batch: pd.DataFrame, actors: list, cfg: TrainConfig, iteration: int) -> pd.DataFrame:
    """One response per constitution, from a long-lived rollout actor (picked by the batch's first query)."""
    prompts = [p for row in batch["generation_prompts"] for p in row]
    key = zlib.crc32(str(batch["query_id"].iloc[0]).encode())  # stable across processes, unlike hash()
    actor = actors[key % len(actors)]
    seed = cfg.run.seed * 1000 + iteration + key % 997
    completions = ray.get(actor.generate.remote(prompts, cfg.sampling, seed))
    c = cfg.principles.num_constitutions
    texts = [comp["text"].strip() for comp in completions]
    return batch.assign(
        responses=[texts[i : i + c] for i in range(0, len(texts), c)],
        response_tokens=[sum(len(comp["token_ids"]) for comp in completions[i : i + c]) / c for i in range(0, len(texts), c)],
        truncated=[sum(comp["finish_reason"] == "length" for comp in completions[i : i + c]) for i in range(0, len(texts), c)],
    )


@functools.lru_cache(maxsize=4)
def cached_tokenizer(path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def filter_and_tokenise(batch: pd.DataFrame, cfg: TrainConfig, tokenizer_path: str) -> pd.DataFrame:
    """Mark each group's reject reason ('' = kept) and tokenise training prompts and responses."""
    tok = cached_tokenizer(tokenizer_path, cfg.model.trust_remote_code)
    reasons, prompt_ids, response_ids = [], [], []
    for query, cons, responses in zip(batch["query"], batch["constitutions"], batch["responses"]):
        reasons.append(reject_reason(list(responses), cfg.filters))
        prompts = [training_prompt(cfg.data.task, c, query) for c in cons]
        prompt_ids.append([ids[-cfg.model.max_prompt_tokens :] for ids in tok(prompts, add_special_tokens=False).input_ids])
        # a leading space: the response continues the prompt as it did when it was generated
        resp = tok([" " + r for r in responses], add_special_tokens=False).input_ids
        response_ids.append([ids[: cfg.model.max_response_tokens] + [tok.eos_token_id] for ids in resp])
    return batch.assign(reject_reason=reasons, prompt_ids=prompt_ids, response_ids=response_ids)


def build_iteration_dataset(queries: list[dict], writer, actors: list, cfg: TrainConfig, iteration: int,
                            tokenizer_path: str):
    """The iteration's query groups as a materialised Ray Dataset, plus the filter counts."""
    rows_per_batch = max(1, cfg.sampling.batch_size // cfg.principles.num_constitutions)
    ray.data.DataContext.get_current().enable_progress_bars = False  # one progress line per phase instead
    ds = ray.data.from_items(queries)
    # The UDFs mostly wait on actors: a small CPU share keeps them from starving the learners (DESIGN §4).
    ds = ds.map_batches(add_constitutions, fn_kwargs={"writer": writer, "cfg": cfg, "iteration": iteration},
                        batch_format="pandas", batch_size=rows_per_batch, num_cpus=0.1)
    ds = ds.map_batches(add_responses, fn_kwargs={"actors": actors, "cfg": cfg, "iteration": iteration},
                        batch_format="pandas", batch_size=rows_per_batch, num_cpus=0.1)
    ds = ds.map_batches(filter_and_tokenise, fn_kwargs={"cfg": cfg, "tokenizer_path": tokenizer_path},
                        batch_format="pandas", batch_size=rows_per_batch, num_cpus=0.1)
    ds = ds.drop_columns(["generation_prompts"]).materialize()
    reasons = ds.select_columns(["reject_reason"]).to_pandas()["reject_reason"]
    counts = {f"filtered_{r}": int((reasons == r).sum()) for r in REASONS}
    kept = ds.filter(expr="reject_reason == ''").materialize()
    return kept, counts


def replay_iteration_dataset(source_run: Path, iteration: int):
    """Iteration k's groups as another run generated them (filtering already applied there)."""
    path = source_run / f"iteration-{iteration}" / "groups.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"data.replay_groups_from: {path} does not exist (did that run reach iteration {iteration}?)")
    # One small file: pyarrow reads it in milliseconds, where a read_parquet job costs seconds of scheduling.
    return ray.data.from_arrow(pyarrow.parquet.read_table(path)), {f"filtered_{r}": 0 for r in REASONS}


def row_constitutions(row: dict) -> list[Constitution]:
    return [Constitution(tuple((n, bool(p)) for n, p in stances)) for stances in json.loads(row["stances"])]
