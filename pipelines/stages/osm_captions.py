"""SkyScript-style captions from OSM tags (pure functions; the tag table is
``pipelines/recipes/data/skyscript_tags.json``, :class:`pipelines.sources.osm.TagTable`).

- :func:`focus_caption`: the focus object's caption, ``[prefixes] object [with a and b]``:
  ``building`` + ``roof:shape=gabled`` → ``gabled roof building``; ``highway=residential`` +
  ``surface=asphalt`` → ``residential road with surface of asphalt``; a ``power=minor_line``
  with ``cables=3`` and ``voltage=16000`` → ``power minor line with cables of 3 and voltage
  of 16000`` (SkyScript's "key of value" phrasing). Only prefixes/attributes that apply to
  the focus object's key are used (``surface`` says nothing about a building).
- :func:`multi_caption`: the focus caption, then ``surrounded by`` the other objects in the
  tile counted by phrase: ``gabled roof building, surrounded by 3 roads and 2 parking lots``.
  Groups are ordered by count (most first), then by phrase; at most ``max_groups``.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

from pipelines.sources.osm import TagEntry, TagTable


def join_and(parts: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    parts = [p for p in parts if p]
    if len(parts) <= 1:
        return "".join(parts)
    return f"{', '.join(parts[:-1])} and {parts[-1]}"


def _phrases(tags: Mapping[str, str], table: TagTable
             ) -> tuple[TagEntry | None, list[str], list[str]]:
    focus, prefixes, attributes = table.caption_entries(tags)
    pre = [e.text(tags.get(e.key)) for e in prefixes]
    att = [e.text(tags.get(e.key)) for e in attributes]
    return focus, pre, att


def _compose(prefixes: list[str], head: str, attributes: list[str]) -> str:
    text = " ".join([*prefixes, head]).strip()
    if attributes:
        text = f"{text} with {join_and(attributes)}" if text else join_and(attributes)
    return text


def focus_caption(tags: Mapping[str, str], table: TagTable, *, plural: bool = False) -> str:
    """The caption of one object from its tags; ``""`` when no tag is in the table. With
    ``plural`` the object's phrase is plural (``3 roads with surface of asphalt``)."""
    focus, pre, att = _phrases(tags, table)
    if focus is None:
        return _compose(pre, "", att)
    value = tags.get(focus.key)
    head = focus.plural_text(value) if plural else focus.text(value)
    return _compose(pre, head, att)


def multi_caption(focus_tags: Mapping[str, str], others: Sequence[Mapping[str, str]],
                  table: TagTable, *, max_groups: int = 5) -> str:
    """The focus object's caption, ``surrounded by`` the other objects counted by phrase;
    just the focus caption when no other object is in the table."""
    first = focus_caption(focus_tags, table)
    counts: collections.Counter[str] = collections.Counter()
    plurals: dict[str, str] = {}
    for tags in others:
        phrase = focus_caption(tags, table)
        if not phrase:
            continue
        counts[phrase] += 1
        plurals.setdefault(phrase, focus_caption(tags, table, plural=True))
    groups = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_groups]
    if not groups:
        return first
    parts = [p if n == 1 else f"{n} {plurals[p]}" for p, n in groups]
    around = f"surrounded by {join_and(parts)}"
    return f"{first}, {around}" if first else around
