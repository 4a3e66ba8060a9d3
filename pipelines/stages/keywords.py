"""RS keyword filter: keep a caption that names a remote-sensing term and no exclusion.

The term list is data (``recipes/data/rs5m_keywords.txt``), not code. Matching is whole-word
and case-insensitive; a multi-word term matches its words separated by any run of spaces or
hyphens. An exclusion (``-satellite dish``) rejects a caption even when it also has a term.
"""

from __future__ import annotations

import dataclasses
import re
from importlib import resources
from typing import Any

from apache_beam.io.filesystems import FileSystems

from pipelines.records import Reject

DEFAULT_KEYWORDS = "rs5m_keywords.txt"


def _pattern(phrases: list[str]) -> re.Pattern[str] | None:
    if not phrases:
        return None
    alts = []
    # longest first so "satellite imagery" is reported rather than "satellite"
    for phrase in sorted(set(phrases), key=lambda p: (-len(p), p)):
        words = [re.escape(w) for w in re.split(r"[\s\-]+", phrase.strip()) if w]
        alts.append(r"[\s\-]+".join(words))
    return re.compile(r"(?<!\w)(?:" + "|".join(alts) + r")(?!\w)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class KeywordFilter:
    terms: tuple[str, ...]
    exclusions: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "_terms_re", _pattern(list(self.terms)))
        object.__setattr__(self, "_excl_re", _pattern(list(self.exclusions)))

    @classmethod
    def parse(cls, text: str) -> KeywordFilter:
        terms, excl = [], []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            (excl if line.startswith("-") else terms).append(line.lstrip("-").strip())
        if not terms:
            raise ValueError("keyword file has no terms")
        return cls(tuple(terms), tuple(excl))

    @classmethod
    def load(cls, path: str | None = None) -> KeywordFilter:
        """``path`` (any Beam filesystem) or the bundled RS5M list."""
        if path is None:
            text = resources.files("pipelines.recipes").joinpath("data", DEFAULT_KEYWORDS)
            return cls.parse(text.read_text(encoding="utf-8"))
        with FileSystems.open(path) as f:
            return cls.parse(f.read().decode("utf-8"))

    def match(self, caption: str) -> str | None:
        """The first term found in ``caption`` (lower-cased), or None."""
        m = self._terms_re.search(caption)
        return m.group(0).lower() if m else None

    def __call__(self, record: dict[str, Any]) -> dict[str, Any] | Reject:
        caption = record.get("caption") or ""
        excluded = self._excl_re.search(caption) if self._excl_re else None
        if excluded:
            return Reject("keywords", "excluded_phrase", excluded.group(0).lower())
        term = self.match(caption)
        if term is None:
            return Reject("keywords", "no_keyword", None)
        return record
