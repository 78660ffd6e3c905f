"""Queries and responses of the built-in world.

A response is generated from six binary attributes (short, polite, names the subject, has a number,
ends with '!', lower case). In the corpus, each attribute that the constitution states agrees with the
stated stance with probability `p_follow` and takes the opposite value otherwise, so a model trained on
it follows principles with adherence ≈ p_follow; unstated attributes are drawn at random.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from sami.constitutions import Constitution, render_constitution
from sami.prompts import training_prompt
from sami.world.rules import POLITE_WORDS, PRINCIPLES, satisfies

SUBJECTS = (
    "river mountain garden city ocean forest library bridge castle desert island museum train market school "
    "harbor village planet volcano lake tower farm bakery canyon glacier meadow temple station theater valley"
).split()
QUERY_TEMPLATES = (
    "Tell me about the {s}.",
    "What do you know about the {s}?",
    "Describe the {s}.",
    "Can you explain the {s}?",
    "Give me facts about the {s}.",
)
ADJECTIVES = "old calm bright quiet busy green cold warm large small famous lovely".split()
THINGS = "paths rooms trees boats doors stones birds lights".split()
PLACEHOLDERS = ("it", "this place", "that one")
FILLERS = (
    "and it feels {a} and {b} to most people",
    "so many visitors say it is {a} in every season",
    "which makes it a {a} and {b} place to spend a long day",
)
LIBRARY = {p.name: p for p in PRINCIPLES}


@dataclass(frozen=True)
class Query:
    text: str
    subject: str


def sample_query(rng: random.Random) -> Query:
    subject = rng.choice(SUBJECTS)
    return Query(rng.choice(QUERY_TEMPLATES).format(s=subject), subject)


def render_response(attrs: dict[str, bool], subject: str, rng: random.Random) -> str:
    """One sentence with exactly the given attributes (keys: the principle names, value: property holds)."""
    parts = [rng.choice(POLITE_WORDS) + ","] if attrs["polite"] else []
    parts += [f"the {subject}" if attrs["subject"] else rng.choice(PLACEHOLDERS), "is", rng.choice(ADJECTIVES)]
    if attrs["number"]:
        parts += ["with", str(rng.randint(2, 99)), rng.choice(THINGS)]
    if not attrs["concise"]:  # short forms have at most 8 words; long ones at least 13
        parts.append(rng.choice(FILLERS).format(a=rng.choice(ADJECTIVES), b=rng.choice(ADJECTIVES)))
    text = " ".join(parts) + ("!" if attrs["exclaim"] else ".")
    if not attrs["lowercase"]:
        text = " ".join(w[:1].upper() + w[1:] for w in text.split(" "))
    return text


def sample_attributes(constitution: Constitution, p_follow: float, rng: random.Random) -> dict[str, bool]:
    stated = dict(constitution.stances)
    attrs = {}
    for p in PRINCIPLES:
        if p.name in stated:
            follow = rng.random() < p_follow
            attrs[p.name] = stated[p.name] if follow else not stated[p.name]
        else:
            attrs[p.name] = rng.random() < 0.5
    return attrs


def sample_world_constitution(rng: random.Random, names: list[str], k_choices=(2, 3)) -> Constitution:
    """k of `names` with random stances (the corpus' constitutions; every principle appears in pretraining)."""
    chosen = sorted(rng.sample(names, rng.choice(k_choices)))
    return Constitution(tuple((n, rng.random() < 0.5) for n in chosen))


def corpus_document(rng: random.Random, p_follow: float) -> tuple[str, str]:
    """(training prompt, response) for one pretraining document."""
    query = sample_query(rng)
    con = sample_world_constitution(rng, [p.name for p in PRINCIPLES])
    response = render_response(sample_attributes(con, p_follow, rng), query.subject, rng)
    return training_prompt("world", render_constitution(con, LIBRARY, rng), query.text), response


def follows(response: str, subject: str, constitution: Constitution) -> float:
    """Share of stated stances the response follows (the grammar's own bookkeeping, for tests)."""
    return sum(satisfies(response, subject, n, pos) for n, pos in constitution.stances) / len(constitution.stances)
