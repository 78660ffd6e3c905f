"""The query group: the one batch shape that flows from generation to the loss, and the pure stages that build it.

One `QueryGroup` is one query with its C constitutions and the C responses sampled under them: one SAMI
matrix, never split across learners. The stages are plain functions (no Ray), in the order one iteration runs
them:

    draw_constitutions   queries -> C constitutions each (seeded per query)
    plan_groups          queries + constitutions -> groups with generation prompts and training renderings
                         (training's and the evaluation's planning stage; `RenderSeeds` keys the shuffles)
    generation_batches   groups -> the fixed generation batches (one Ray Data block each)
    attach_completions   the rollout engines' completions -> responses (text, and the token ids sampled)
    filter_groups        mark malformed groups (counts per reason)
    tokenise_group       tokenise a kept group's training prompts (on the learner rank that trains it)
    shuffle_pairs        (a replay's negative control) responses moved to random constitutions

The learner scores exactly the tokens the engine sampled: `prompt_token_ids` tokenises every prompt, the engines'
and the learner's alike (with the special tokens the tokenizer itself puts in front, a Llama or Mistral BOS), and
a response's ids are the engine's own, never its text tokenised again (with a SentencePiece tokenizer the two can
differ). `tokenise_pairs` tokenises (prompt, response) texts for what has no sampled ids: the evaluation's MI
bound of another model's responses. `groups.parquet` in each iteration folder holds one `QueryGroup.record()` per
kept group.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, fields
from typing import Protocol

from sami.config import FilterConfig, PrinciplesConfig
from sami.constitutions import Constitution, render_constitution, sample_constitutions
from sami.filters import REASONS, reject_reason
from sami.principles import Principle
from sami.prompts import generation_prompt, training_prompt


@dataclass
class QueryGroup:
    query_id: str
    query: str
    subject: str = ""  # the built-in world's judge needs it; empty elsewhere
    stances: str = "[]"  # JSON: C lists of [principle, positive]; [0] is the positive constitution
    constitutions: list[str] = field(default_factory=list)  # C training renderings (principles reshuffled)
    generation_prompts: list[str] = field(default_factory=list)  # C prompts the rollout engines answer
    responses: list[str] = field(default_factory=list)  # responses[j] was sampled under constitution j
    response_tokens: float = 0.0  # mean generated tokens per response
    truncated: int = 0  # responses cut at max_new_tokens
    reject_reason: str = ""  # '' = kept; else the filter reason (sami.filters.REASONS)
    prompt_ids: list[list[int]] = field(default_factory=list)  # C training prompts, tokenised
    # C responses: the token ids the engine sampled, ending with the stop token it sampled (EOS where
    # max_new_tokens cut the response)
    response_ids: list[list[int]] = field(default_factory=list)
    # The iteration whose weights generated the responses (0: the base model) and how many iterations older
    # they are than on-policy (iteration - 1 - policy_iteration). None: a groups.parquet from before this field.
    policy_iteration: int | None = None
    staleness: int | None = None

    def stated(self) -> list[Constitution]:
        """The C constitutions as `Constitution`s, the positive one first (what a rule judge checks)."""
        return [Constitution(tuple((name, bool(positive)) for name, positive in c)) for c in json.loads(self.stances)]

    def training_prompts(self, task: str) -> list[str]:
        """The C prompts the learner (and the evaluation's MI bound) scores the responses under."""
        return [training_prompt(task, c, self.query) for c in self.constitutions]

    def record(self) -> dict:
        """The row written to groups.parquet (generation prompts are not kept: the renderings are)."""
        row = asdict(self)
        del row["generation_prompts"]
        return row

    @classmethod
    def from_record(cls, row: dict) -> "QueryGroup":
        """A row back from parquet: Arrow hands back numpy arrays, the learner wants lists of ints."""
        known = {f.name for f in fields(cls)}
        group = cls(**{k: v for k, v in row.items() if k in known})
        group.constitutions, group.responses = list(group.constitutions), list(group.responses)
        group.prompt_ids = [list(map(int, ids)) for ids in group.prompt_ids]
        group.response_ids = [list(map(int, ids)) for ids in group.response_ids]
        return group


def row_rng(seed: int, iteration: int, query_id: str, purpose: str) -> random.Random:
    return random.Random(f"{seed}/{iteration}/{query_id}/{purpose}")


def generation_seeds(group: "QueryGroup", seed: int, iteration: int) -> list[int]:
    """The sampling seed of each of the group's generation prompts."""
    rng = row_rng(seed, iteration, group.query_id, "sampling")
    return [rng.getrandbits(31) for _ in group.generation_prompts]


class RenderSeeds(Protocol):
    """Where the planning stage's shuffles come from: training and evaluation key them differently (each keeps
    its own keys, so a run or an evaluation repeats exactly)."""

    def renderings(self, query_id: str, c: int) -> tuple[list[random.Random], list[random.Random]]:
        """(the streams that render each of the query's C constitutions in its generation prompt, for training)."""


@dataclass(frozen=True)
class TrainingSeeds:
    """Training's shuffles: one stream per (run seed, iteration, query, purpose), drawn in constitution order."""

    seed: int
    iteration: int

    def renderings(self, query_id: str, c: int) -> tuple[list[random.Random], list[random.Random]]:
        generation, training = (row_rng(self.seed, self.iteration, query_id, p) for p in ("generation", "training"))
        return [generation] * c, [training] * c


def draw_constitutions(principles: list[Principle], cfg: PrinciplesConfig, query_ids: list[str],
                       seed: int | str, members: tuple[str, ...] | None = None) -> list[list[Constitution]]:
    """Each query's C constitutions (the positive one first), drawn from `random.Random(f"{seed}/{query id}")`
    alone, so a query's draw does not depend on its batch. Each states one of `members` (default: the family members
    training states); the evaluation passes the held-out ones too."""
    members = cfg.trained_members if members is None else members
    heldout = tuple(n for n in cfg.heldout_names + cfg.trained_members if n not in members)
    return [sample_constitutions(principles, cfg.num_constitutions, cfg.mode, random.Random(f"{seed}/{q}"),
                                 k=cfg.principles_per_constitution, heldout=heldout, family=members) for q in query_ids]


def plan_groups(queries: list[dict], library: list[Principle], constitutions: list[list[Constitution]], task: str,
                seeds: RenderSeeds) -> list[QueryGroup]:
    """The planning stage of training and evaluation alike: each query's C constitutions rendered twice, in
    the generation prompt and (with `seeds`' training stream) for the training prompt."""
    by_name = {p.name: p for p in library}
    groups = []
    for row, cons in zip(queries, constitutions):
        rng_gen, rng_train = seeds.renderings(row["query_id"], len(cons))
        groups.append(QueryGroup(
            query_id=row["query_id"], query=row["query"], subject=row.get("subject", ""),
            stances=json.dumps([list(map(list, c.stances)) for c in cons]),
            generation_prompts=[generation_prompt(task, render_constitution(c, by_name, r), row["query"])
                                for c, r in zip(cons, rng_gen)],
            constitutions=[render_constitution(c, by_name, r) for c, r in zip(cons, rng_train)],
        ))
    return groups


def attach_completions(groups: list[QueryGroup], completions: list[dict]) -> None:
    """`completions` (`text`, `token_ids`, `end_id`, `finish_reason`: `sami.rollout_engines.Completion`) answer every
    group's generation prompts, in order."""
    expected = sum(len(g.generation_prompts) for g in groups)
    if len(completions) != expected:
        raise ValueError(f"{len(completions)} completions for {expected} generation prompts")
    start = 0
    for g in groups:
        mine = completions[start : start + len(g.generation_prompts)]
        start += len(mine)
        g.responses = [c["text"].strip() for c in mine]
        g.response_ids = [list(c["token_ids"]) + [c["end_id"]] for c in mine]
        g.response_tokens = sum(len(c["token_ids"]) for c in mine) / len(mine)
        g.truncated = sum(c["finish_reason"] == "length" for c in mine)


def padding_id(tokenizer) -> int:
    """The id that pads scored batches: the tokenizer's pad token, else its EOS (padding is masked either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def prompt_token_ids(tokenizer, prompts: list[str], max_tokens: int | None = None) -> list[list[int]]:
    """Every prompt's token ids, as the engines generate from them and the learner scores them: the special tokens
    the tokenizer itself puts in front of a text (a Llama or Mistral tokenizer's BOS; none for GPT-2's), then the
    text's tokens, of which the end is kept when the whole is longer than `max_tokens`. A text that already starts
    with them (a chat template renders Llama 2's or Mistral's BOS into the text) gets no second copy."""
    bare = tokenizer(list(prompts), add_special_tokens=False).input_ids
    full = tokenizer(list(prompts)).input_ids
    out = []
    for text_ids, ids in zip(bare, full):
        front = ids[: len(ids) - len(text_ids)] if ids[len(ids) - len(text_ids):] == text_ids else []
        if front and text_ids[: len(front)] == front:  # the text renders them itself: kept once, in front
            text_ids = text_ids[len(front):]
        keep = len(text_ids) if max_tokens is None else min(len(text_ids), max(max_tokens - len(front), 0))
        out.append(front + text_ids[len(text_ids) - keep:])
    return out


def cut_response(ids: list[int], max_tokens: int | None, eos_id: int) -> list[int]:
    """A response's ids (ending with its stop token) cut to `max_tokens` tokens before EOS, if longer."""
    return ids if max_tokens is None or len(ids) <= max_tokens + 1 else ids[:max_tokens] + [eos_id]


def tokenise_pairs(tokenizer, prompts: list[str], responses: list[str], max_prompt_tokens: int | None = None,
                   max_response_tokens: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of (prompt, response) texts whose sampled ids are not known: the prompt as `prompt_token_ids`,
    the response after a space (it continues the prompt as it did when it was generated), cut to
    `max_response_tokens`, EOS last."""
    response_ids = [cut_response(ids + [tokenizer.eos_token_id], max_response_tokens, tokenizer.eos_token_id)
                    for ids in tokenizer([" " + r for r in responses], add_special_tokens=False).input_ids]
    return prompt_token_ids(tokenizer, prompts, max_prompt_tokens), response_ids


def filter_groups(groups: list[QueryGroup], filters: FilterConfig) -> dict[str, int]:
    """Set each group's `reject_reason` ('' = kept: all C responses pass the filters); `filtered_<reason>` counts."""
    for g in groups:
        g.reject_reason = reject_reason(g.responses, filters)
    return reject_counts(groups)


def reject_counts(groups: list[QueryGroup]) -> dict[str, int]:
    """`filtered_<reason>`: how many of `groups` the filters dropped, per reason."""
    return {f"filtered_{r}": sum(g.reject_reason == r for g in groups) for r in REASONS}


def tokenise_group(group: QueryGroup, tokenizer, task: str, max_prompt_tokens: int, max_response_tokens: int) -> QueryGroup:
    """`group` with its training prompts tokenised and its sampled responses cut to `max_response_tokens`."""
    group.prompt_ids = prompt_token_ids(tokenizer, group.training_prompts(task), max_prompt_tokens)
    group.response_ids = [cut_response(ids, max_response_tokens, tokenizer.eos_token_id) for ids in group.response_ids]
    return group


def filter_and_tokenise(groups: list[QueryGroup], tokenizer, filters: FilterConfig, task: str, max_prompt_tokens: int,
                        max_response_tokens: int) -> tuple[list[QueryGroup], dict[str, int]]:
    """(the kept groups, tokenised, in the order given; `filtered_<reason>` counts)."""
    counts = filter_groups(groups, filters)
    return [tokenise_group(g, tokenizer, task, max_prompt_tokens, max_response_tokens)
            for g in groups if not g.reject_reason], counts


def generation_batches(groups: list[QueryGroup], batch_size: int, c: int, ranks: int = 1) -> list[list[QueryGroup]]:
    """The fixed generation batches of an iteration, in query order: `batch_size // C` groups each (at least one),
    fewer where that leaves any of `ranks` learner ranks streaming fewer than two batches (it trains on its first
    while its second generates). One rank, or batches much smaller than the iteration (any real run's), keep
    `batch_size // C`: the direct path's cut, and an engine's batch decides its samples' numerics."""
    per_batch = max(1, min(batch_size // c, -(-len(groups) // (2 * ranks)) if ranks > 1 else batch_size // c))
    return [groups[i : i + per_batch] for i in range(0, len(groups), per_batch)]


def shuffle_pairs(groups: list[QueryGroup], rng: random.Random) -> list[QueryGroup]:
    """The groups with every response moved to a random (group, constitution) slot of the iteration: a negative
    control that keeps the responses and prompts but breaks which constitution a response answered."""
    slots = [(g.responses[j], g.response_ids[j]) for g in groups for j in range(len(g.responses))]
    rng.shuffle(slots)
    start = 0
    for g in groups:
        g.responses, g.response_ids = map(list, zip(*slots[start : start + len(g.responses)]))
        start += len(g.responses)
    return groups


def group_to_json(group: QueryGroup) -> str:
    """The whole group (generation prompts too) as one JSON string: a one-column row for Ray Data."""
    return json.dumps(asdict(group))


def group_from_json(text: str) -> QueryGroup:
    return QueryGroup(**json.loads(text))
