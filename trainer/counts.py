"""Object counts in captions: find them and swap them for another number, grammar kept.

Two users:

* the trainer's counting loss (``--count-loss``; Paiss et al., "Teaching CLIP to Count to Ten",
  ICCV 2023): a caption that states a count of 1..10 gets a *counterfactual* twin with another
  count, and the image must prefer its true caption to the twin;
* the bench's RemoteCount protocol (``trainer/bench/protocols.py``), which swaps the true
  count for each of 1..10.

A count is a number, as digits or an English word (``1``..``10``, ``one``..``ten``), followed
by a noun phrase whose head is a lowercase word: "3 airplanes", "two storage tanks", "one
baseball diamond". Numbers that are not counts are left alone: decimals ("0.49 m"), percents,
units ("10 degrees off nadir", "0.5 m per pixel"), dates ("3 March"), and numbers above 10.

A swap keeps the number's form (a word stays a word, capitalised if it was; digits stay digits)
unless asked for digits, inflects the phrase's head noun (``1 storage tank`` ↔ ``2 storage
tanks``: the last word of the phrase, not the first) and the ``is``/``are`` right before the
number or right after the phrase, so that grammar alone never tells a swapped caption from a
true one.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten")
COUNT_RANGE = (1, 10)


def _wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: words that end a counted noun phrase (function words, common verbs after a subject)
_STOP = _wordset("""
and or but nor of in on at by to from with without near next beside along across around
among between behind above below under over inside outside within into onto off away
the a an this that these those which who whose where while than as
is are was were be been being can could may might will would shall should must do does did
has have had appear appears appearing seen visible located lie lies lying sit sits sitting
stand stands standing park parked moored surrounded scattered shown shows showing
""")
#: words after a number that make it a measure, not a count
_UNITS = _wordset("""
m km cm mm meter meters metre metres degree degrees deg percent pixel pixels px
am pm year years day days month months hour hours minute minutes second seconds
times band bands bit bits byte bytes kb mb gb x th st nd rd
""")
_NUM = re.compile(r"(?<![\w.,%-])(\d{1,2}|" + "|".join(NUMBER_WORDS) + r")(?![\w%]|[.,]\d)",
                  re.IGNORECASE)
_WORD = re.compile(r"\s+([A-Za-z][A-Za-z-]*)")


@dataclass(frozen=True)
class Count:
    """One count in a caption: ``text[start:end]`` is the number, ``value`` its value,
    ``head_start:head_end`` the phrase's head noun."""

    start: int
    end: int
    value: int
    word: bool
    head_start: int
    head_end: int
    phrase_end: int


def _value(tok: str) -> tuple[int, bool]:
    low = tok.lower()
    if low.isdigit():
        return int(low), False
    return NUMBER_WORDS.index(low), True


def _phrase(text: str, pos: int, singular: bool, max_words: int = 3) -> tuple[int, int, int] | None:
    """(head start, head end, phrase end) of the noun phrase from ``pos``, or None."""
    head = None
    for _ in range(max_words):
        m = _WORD.match(text, pos)
        if not m:
            break
        w = m.group(1)
        if w.lower() in _STOP or not w.islower():
            break
        if singular and head is not None and w.endswith("s") and not w.endswith("ss"):
            break  # "one plane sits": a verb agreeing with a singular subject
        head = (m.start(1), m.end(1))
        pos = m.end(1)
        if not singular and w.endswith("s"):
            break  # "two storage tanks": the plural head ends the phrase
    if head is None or text[head[0]:head[1]].lower() in _UNITS:
        return None
    return head[0], head[1], pos


def find_counts(text: str, lo: int = COUNT_RANGE[0], hi: int = COUNT_RANGE[1]) -> list[Count]:
    """The counts of ``lo``..``hi`` objects stated in ``text``, in order."""
    out = []
    for m in _NUM.finditer(text):
        value, word = _value(m.group(1))
        if not lo <= value <= hi:
            continue
        ph = _phrase(text, m.end(), singular=value == 1)
        if ph is None:
            continue
        out.append(Count(m.start(), m.end(), value, word, *ph))
    return out


def plural(noun: str) -> str:
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if len(noun) > 1 and noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def singular(noun: str) -> str:
    if noun.endswith("ies") and len(noun) > 3:
        return noun[:-3] + "y"
    if noun.endswith(("ses", "xes", "ches", "shes")):
        return noun[:-2]
    if noun.endswith("s") and not noun.endswith("ss"):
        return noun[:-1]
    return noun


def _number(new: int, c: Count, digits: bool, original: str) -> str:
    if digits or not c.word or new >= len(NUMBER_WORDS):
        return str(new)
    w = NUMBER_WORDS[new]
    return w.capitalize() if original[:1].isupper() else w


def _agree_be(original: str, new: int) -> str:
    be = "is" if new == 1 else "are"
    return be.capitalize() if original[:1].isupper() else be


def swap(text: str, c: Count, new: int, digits: bool = False) -> str:
    """``text`` with count ``c`` replaced by ``new`` (digits when ``digits`` or when it was
    digits), its head noun and adjacent ``is``/``are`` made to agree."""
    head = text[c.head_start:c.head_end]
    if (c.value == 1) != (new == 1):
        head = plural(head) if new != 1 else singular(head)
    before, after = text[:c.start], text[c.phrase_end:]
    mb = re.search(r"\b(is|are|Is|Are)(\s+)$", before)
    if mb and (c.value == 1) != (new == 1):
        before = before[:mb.start()] + _agree_be(mb.group(1), new) + mb.group(2)
    ma = re.match(r"(\s+)(is|are)\b", after)
    if ma and (c.value == 1) != (new == 1):
        after = ma.group(1) + _agree_be(ma.group(2), new) + after[ma.end():]
    middle = text[c.end:c.head_start] + head + text[c.head_end:c.phrase_end]
    return before + _number(new, c, digits, text[c.start:c.end]) + middle + after


def counterfactual_twins(text: str, rng: random.Random, k: int = 1, lo: int = COUNT_RANGE[0],
                         hi: int = COUNT_RANGE[1]) -> tuple[int, list[tuple[str, int]]]:
    """(the stated count, ``k`` twins as ``(text, count)``): each twin has the same one of
    ``text``'s counts (chosen by ``rng``) changed to another value in ``lo``..``hi`` (``k``
    distinct values drawn without replacement, at most ``hi - lo`` of them); (0, []) when
    ``text`` states no count."""
    counts = find_counts(text, lo, hi)
    if not counts:
        return 0, []
    c = counts[rng.randrange(len(counts))]
    others = [v for v in range(lo, hi + 1) if v != c.value]
    return c.value, [(swap(text, c, new), new)
                     for new in rng.sample(others, min(k, len(others)))]


def counterfactuals(text: str, rng: random.Random, k: int = 1, lo: int = COUNT_RANGE[0],
                    hi: int = COUNT_RANGE[1]) -> list[str]:
    """The texts of :func:`counterfactual_twins` (the same draws from ``rng``)."""
    return [t for t, _ in counterfactual_twins(text, rng, k, lo, hi)[1]]


def soft_targets(true: int, twins: list[int], sigma: float) -> list[float]:
    """The count loss's target over ``[true, *twins]``: 1 on the true count when ``sigma`` is 0
    (Paiss et al.), else weights ``exp(-(ln v - ln true)² / 2σ²)`` normalised to sum 1, so a
    near count (in ratio: 9 for 10 is nearer than 1 for 2) costs less than a far one."""
    if sigma <= 0:
        return [1.0] + [0.0] * len(twins)
    w = [math.exp(-((math.log(v) - math.log(true)) ** 2) / (2 * sigma * sigma))
         for v in [true, *twins]]
    z = sum(w)
    return [x / z for x in w]

