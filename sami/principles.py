"""Principles: a name, a definition and its antithesis, loaded from a YAML/JSON library with validation, or
from a built-in library that the code providing it registers (`register_library`; the demo world does)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml


class PrincipleError(ValueError):
    """A malformed principle library; the message names the file and the entry."""


@dataclass(frozen=True)
class Principle:
    name: str
    definition: str  # the positive form, e.g. "Address human requests with depth and clarity."
    antithesis: str  # its opposite, used in contrastive constitutions


_FIELDS = {"name", "definition", "antithesis"}


@dataclass(frozen=True)
class BuiltinLibrary:
    """The principles `principles.source: <name>` serves, those training never states unless
    `principles.heldout` names others, and a family: principles of one form, one of which every constitution states
    (`PrinciplesConfig.trained_members`)."""

    principles: tuple[Principle, ...]
    heldout: tuple[str, ...]
    family: tuple[str, ...] = ()


BUILTIN_LIBRARIES: dict[str, BuiltinLibrary] = {}


def register_library(source: str, principles: list[Principle], heldout: tuple[str, ...] = (),
                     family: tuple[str, ...] = ()) -> None:
    BUILTIN_LIBRARIES[source] = BuiltinLibrary(tuple(principles), tuple(heldout), tuple(family))


def builtin_library(source: str) -> BuiltinLibrary:
    if source not in BUILTIN_LIBRARIES:
        raise PrincipleError(f"principles.source {source!r}: no built-in principle library of that name is registered "
                             f"(registered: {sorted(BUILTIN_LIBRARIES) or 'none'})")
    return BUILTIN_LIBRARIES[source]


def validate_principles(entries: list, source: str) -> list[Principle]:
    """Turn raw mappings into Principles; every problem names `source` and the entry."""
    if not isinstance(entries, list) or not entries:
        raise PrincipleError(f"{source}: expected a non-empty list of principles")
    principles, seen = [], set()
    for index, entry in enumerate(entries):
        where = f"{source}: principle #{index + 1}"
        if not isinstance(entry, dict):
            raise PrincipleError(f"{where}: expected a mapping with {sorted(_FIELDS)}, got {entry!r}")
        where += f" ({entry.get('name')!r})" if entry.get("name") else ""
        unknown = set(entry) - _FIELDS
        if unknown:
            raise PrincipleError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_FIELDS)}")
        for field in sorted(_FIELDS):
            value = entry.get(field)
            if value is None:
                raise PrincipleError(f"{where}: missing {field!r}")
            if not isinstance(value, str) or not value.strip():
                raise PrincipleError(f"{where}: {field!r} must be non-empty text, got {value!r}")
            try:
                value.encode("utf-8")  # a lone surrogate ("\ud800" in YAML or JSON) reaches no tokenizer
            except UnicodeEncodeError as e:
                raise PrincipleError(f"{where}: {field!r} holds a lone surrogate ({value[e.start]!r} at character "
                                     f"{e.start}), not text") from None
        name = entry["name"].strip()
        if name in seen:
            raise PrincipleError(f"{where}: duplicate name {name!r}")
        seen.add(name)
        principles.append(Principle(name, entry["definition"].strip(), entry["antithesis"].strip()))
    return principles


def load_principles(path: str | Path) -> list[Principle]:
    """Load a library: a list of `{name, definition, antithesis}` or `{"principles": [...]}` (YAML or JSON)."""
    path = Path(path)
    if not path.is_file():
        raise PrincipleError(f"principle file not found: {path}")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise PrincipleError(f"{path}: cannot parse: {e}") from None
    except yaml.YAMLError as e:  # its own message spans lines, with a caret drawing: one line instead
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise PrincipleError(f"{path}: cannot parse as YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if isinstance(data, dict) and set(data) == {"principles"}:
        data = data["principles"]
    return validate_principles(data, str(path))


def save_principles(principles: list[Principle], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    rows = [{"name": p.name, "definition": p.definition, "antithesis": p.antithesis} for p in principles]
    Path(path).write_text(yaml.safe_dump({"principles": rows}, sort_keys=False, width=120))
