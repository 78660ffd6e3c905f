"""Constitutions: which principles a prompt states, each in its positive or antithesis form.

`sample_constitutions` draws the C constitutions of one query (element 0 is always the positive one; the
rest are contrasts); `render_constitution` writes one as a numbered list in a shuffled order, so a model
cannot key on principle position.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from sami.principles import Principle


@dataclass(frozen=True)
class Constitution:
    stances: tuple[tuple[str, bool], ...]  # (principle name, positive?) in canonical order

    @property
    def positive_names(self) -> list[str]:
        return [name for name, positive in self.stances if positive]

    @property
    def is_fully_positive(self) -> bool:
        return all(positive for _, positive in self.stances)


def sample_constitutions(
    principles: list[Principle],
    num: int,
    mode: str,
    rng: random.Random,
    k: int | None = None,
    heldout: tuple[str, ...] | list[str] = (),
    family: tuple[str, ...] | list[str] = (),
) -> list[Constitution]:
    """C constitutions for one query over the non-held-out principles; with `family`, the members of a family of
    principles of one form, each states one member drawn per query besides the others, flipped with them.

    - `antithesis_all`: all principles stated; contrast(s) flip every principle (C must be 2).
    - `antithesis_one`: all principles stated; each contrast flips a different single principle.
    - `sample_k`: k principles drawn per query; contrasts flip a distinct non-empty subset of them.
    - `sample_k_antithesis_all`: k principles drawn per query; the contrast flips all of them (C must be 2).
    """
    unknown = set(heldout) - {p.name for p in principles}
    if unknown:
        raise ValueError(f"held-out principle(s) {sorted(unknown)} are not in the library")
    unknown = set(family) - {p.name for p in principles}
    if unknown:
        raise ValueError(f"family member(s) {sorted(unknown)} are not in the library")
    if set(family) & set(heldout):
        raise ValueError(f"family member(s) {sorted(set(family) & set(heldout))} are held out")
    names = [p.name for p in principles if p.name not in set(heldout) | set(family)]
    if not names:
        raise ValueError("no principles left for training after removing the held-out ones")
    if num < 2:
        raise ValueError(f"num_constitutions must be >= 2, got {num}")
    member = [rng.choice(list(family))] if family else []
    if mode == "antithesis_all":
        names += member
        if num != 2:
            raise ValueError(f"mode antithesis_all makes exactly one contrast, so C must be 2, got {num}")
        flips = [frozenset(names)]
    elif mode == "antithesis_one":
        names += member
        if num - 1 > len(names):
            raise ValueError(f"mode antithesis_one has {len(names)} principles to flip, cannot make {num - 1} contrasts")
        flips = [frozenset([n]) for n in rng.sample(names, num - 1)]
    elif mode in ("sample_k", "sample_k_antithesis_all"):
        if k is None or not 1 <= k <= len(names):
            raise ValueError(f"{mode} needs 1 <= k <= {len(names)} training principles, got k={k}")
        names = rng.sample(names, k) + member
        k = len(names)
        if mode == "sample_k_antithesis_all":
            if num != 2:
                raise ValueError(f"mode sample_k_antithesis_all makes exactly one contrast, so C must be 2, got {num}")
            stated = sorted(names)
            return [Constitution(tuple((n, True) for n in stated)), Constitution(tuple((n, False) for n in stated))]
        subsets = (1 << k) - 1  # non-empty subsets of the k stated principles
        if num - 1 > subsets:
            raise ValueError(f"with k={k} there are only {subsets} distinct contrasts, cannot make {num - 1}")
        masks = rng.sample(range(1, subsets + 1), num - 1)
        flips = [frozenset(n for bit, n in enumerate(names) if mask >> bit & 1) for mask in masks]
    else:
        raise ValueError(f"unknown constitution mode {mode!r}; use antithesis_one, antithesis_all, sample_k or "
                         f"sample_k_antithesis_all")
    stated = sorted(names)
    return [Constitution(tuple((n, n not in flip) for n in stated)) for flip in [frozenset(), *flips]]


def render_constitution(constitution: Constitution, library: dict[str, Principle], rng: random.Random) -> str:
    """A numbered list of the stated principles (definition or antithesis), order shuffled with `rng`."""
    lines = [library[name].definition if positive else library[name].antithesis for name, positive in constitution.stances]
    rng.shuffle(lines)
    return "\n".join(f"{i}. {line}" for i, line in enumerate(lines, 1))
