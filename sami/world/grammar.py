"""Queries and responses of the built-in world.

A response is generated from six binary attributes (short, polite, names the subject, has a number,
ends with '!', lower case) and one colour word ("the river is red and calm"). In the corpus, each attribute that
the constitution states agrees with the stated stance with probability `p_follow` and takes the opposite value
otherwise, so a model trained on it follows principles with adherence ≈ p_follow; unstated attributes are drawn
at random. Every corpus constitution also states one member of the colour family (any member: the base model has
seen the held-out ones too, as a pretrained model has seen such instructions); the colour follows its stance with
probability `p_follow` and is another colour otherwise, so following a member means copying or avoiding the word
the constitution names.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from sami.constitutions import Constitution, render_constitution
from sami.prompts import training_prompt
from sami.world.rules import COLOURS, FAMILY, POLITE_WORDS, PRINCIPLES, member_name, satisfies

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
LIBRARY = {p.name: p for p in PRINCIPLES + FAMILY}


@dataclass(frozen=True)
class Query:
    text: str
    subject: str


def sample_query(rng: random.Random) -> Query:
    subject = rng.choice(SUBJECTS)
    return Query(rng.choice(QUERY_TEMPLATES).format(s=subject), subject)


def render_response(attrs: dict[str, bool], subject: str, rng: random.Random, colour: str | None = None) -> str:
    """One sentence with exactly the given attributes (keys: the six principles' names, value: property holds)
    and `colour` as its one colour word (none if None)."""
    parts = [rng.choice(POLITE_WORDS) + ","] if attrs["polite"] else []
    parts += [f"the {subject}" if attrs["subject"] else rng.choice(PLACEHOLDERS), "is"]
    parts += [colour, "and", rng.choice(ADJECTIVES)] if colour else [rng.choice(ADJECTIVES)]
    if attrs["number"]:
        parts += ["with", str(rng.randint(2, 99)), rng.choice(THINGS)]
    if not attrs["concise"]:  # short forms have at most 10 words; long ones at least 12
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


def sample_colour(constitution: Constitution, p_follow: float, rng: random.Random) -> str:
    """The response's colour word: the stated member's colour with probability `p_follow` under "mention", another
    colour otherwise (the other way round under "never use")."""
    stances = dict(constitution.stances)
    colour = next(c for c in COLOURS if member_name(c) in stances)
    mention, other = stances[member_name(colour)], rng.choice([c for c in COLOURS if c != colour])
    return colour if (rng.random() < p_follow) == mention else other


def corpus_sample(rng: random.Random, p_follow: float) -> tuple[Query, Constitution, str]:
    """(query, constitution, response) of one pretraining document: some of the six principles and one member."""
    query = sample_query(rng)
    con = sample_world_constitution(rng, [p.name for p in PRINCIPLES])
    con = Constitution(con.stances + ((rng.choice(FAMILY).name, rng.random() < 0.5),))
    attrs, colour = sample_attributes(con, p_follow, rng), sample_colour(con, p_follow, rng)
    return query, con, render_response(attrs, query.subject, rng, colour)


def corpus_document(rng: random.Random, p_follow: float) -> tuple[str, str]:
    """(training prompt, response) for one pretraining document."""
    query, con, response = corpus_sample(rng, p_follow)
    return training_prompt("world", render_constitution(con, LIBRARY, rng), query.text), response


def follows(response: str, subject: str, constitution: Constitution) -> float:
    """Share of stated stances the response follows (the grammar's own bookkeeping, for tests)."""
    return sum(satisfies(response, subject, n, pos) for n, pos in constitution.stances) / len(constitution.stances)
