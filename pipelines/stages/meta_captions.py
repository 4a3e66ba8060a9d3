"""Meta captions (RS3): a templated metadata sentence before the generated caption, fitted to
the text encoder's context.

RS5M placed a metadata sentence ("a satellite image of an airport terminal near ..., taken in
..., 0.5 m resolution, UTM zone ..., cloud cover ...") before each BLIP-2 caption. Measured with
CLIP's tokenizer, all of its fMoW captions ran past the 77-token context, so training silently
truncated them and the BLIP-2 part, the one that describes the pixels, was always lost. Here the
caption is ``meta + " " + generated`` and it always fits: metadata fields are dropped, least
useful first, until the whole caption, start and end tokens counted, is at most the context
length. The generated part is never cut; a generated caption that does not fit on its own is
rejected (``generated_too_long``).

Measured (``tests/test_meta_captions.py::test_rs5m_flaw_measured``, 400 synthetic fMoW metadata
sets: real fMoW classes, places drawn from the GeoNames towns (70% with a town, 20% region only,
10% country only), every other field set, a BLIP-2-like caption of 8-30 words, ViT-B-32's
tokenizer): with every field kept, **84.2%** of captions would exceed 77 tokens (mean 87
tokens; the meta sentence alone averages 68), so the generated part would be cut or lost;
after fitting, **0%** exceed (mean 74 tokens), with 1.8 fields dropped on average. (RS5M's own,
wordier templates: 100% of fMoW captions over, mean 130 tokens.)

**Drop priority** (:data:`DROP_PRIORITY`, least useful first): ``off_nadir`` (view angle),
``cloud_cover``, ``utm_zone``, ``gsd``, ``time``, ``date``, ``position``, ``season``, then the
place from its most specific end: ``city``, ``region``, ``country``; then ``labels``, then
``class``. Viewing geometry and grid notation say least about what is in the picture; the class
(fMoW, MillionAID) or the land-cover labels (BigEarthNet) say most, so they go last. A
BigEarthNet label list is first shortened from its end, one label at a time down to its first
label (``meta_dropped`` then holds ``"labels[k:]"``: the labels from index k on were dropped),
before the labels go whole (``"labels"``): a shorter list is still a true statement, only a less
complete one. ``meta_dropped`` lists what was dropped, in the order dropped.

Templates are data (``recipes/data/rs3_meta_templates.json``, or ``--meta_templates FILE``):
families ``fmow``, ``bigearthnet``, ``millionaid``. A template is a lead (the subject: the class
with its article, the bare class, or the label list), a bare lead for when the subject is
absent, and parts, each holding ONE field and its own connecting words ("taken in {date}"), so
a dropped field takes its whole part with it and leaves no dangling words. One template is drawn
per image from ``np.random.default_rng(stable_hash(key))``: the same key, the same template, on
every runner. Each of the record's candidates is fitted with that template (``captions``).

Token counting follows what the tokenizer does to text before it cuts: open_clip's
``SimpleTokenizer`` cleans (ftfy, HTML unescape, whitespace, lower case) inside ``encode``, so
``len(encode(text)) + 2`` (start and end tokens) is exactly what ``tokenizer([text])`` fills
before truncating; ``HFTokenizer`` counts through its Hugging Face tokenizer after the same
``clean_fn`` (special tokens included; ``clips`` mode reserves 3).
"""

from __future__ import annotations

import dataclasses
import json
import re
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import resources
from typing import Any

import apache_beam as beam
import numpy as np

from pipelines.records import MAIN, REJECTS, Reject, stable_hash
from pipelines.stages.georef import country_article, has_time, parse_acquired
from pipelines.stages.routing import CountingDoFn

STAGE = "meta_caption"
DEFAULT_TEMPLATES = "rs3_meta_templates.json"

#: least useful first; see the module docstring
DROP_PRIORITY = (
    "off_nadir", "cloud_cover", "utm_zone", "gsd", "time", "date", "position", "season",
    "city", "region", "country", "labels", "class",
)
PART_FIELDS = ("position", "place", "date", "season", "time", "gsd", "utm_zone", "cloud_cover",
               "off_nadir")
PLACE_FIELDS = ("city", "region", "country")
SUBJECTS = {"a_class": "class", "class": "class", "labels": "labels"}
SEPARATORS = (", ", " ", "; ", ". ")
#: archive source → template family
FAMILY_OF_SOURCE = {"fmow-rgb": "fmow", "fmow-full": "fmow", "bigearthnet": "bigearthnet",
                    "millionaid": "millionaid"}
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
POSITION_PHRASES = {
    "top left": "in the top left of the image", "top": "at the top of the image",
    "top right": "in the top right of the image", "left": "on the left of the image",
    "centre": "in the centre of the image", "right": "on the right of the image",
    "bottom left": "in the bottom left of the image", "bottom": "at the bottom of the image",
    "bottom right": "in the bottom right of the image",
}


# --- templates -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Template:
    """A lead (subject), a bare lead (no subject) and one-field parts ``(field, text, sep)``."""

    lead: str
    bare: str
    parts: tuple[tuple[str, str, str], ...]

    def fields(self) -> frozenset[str]:
        """The record fields this template can render (``place`` → city, region, country)."""
        out = {SUBJECTS[n] for n in _placeholders(self.lead)}
        for field, _, _ in self.parts:
            out.update(PLACE_FIELDS if field == "place" else (field,))
        return frozenset(out)


@dataclasses.dataclass(frozen=True)
class TemplateSet:
    families: Mapping[str, tuple[Template, ...]]
    class_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    no_article: frozenset[str] = frozenset()
    skip_classes: frozenset[str] = frozenset()

    def pick(self, family: str, key: str) -> Template | None:
        """The template of ``key`` in ``family`` (None for an unknown family): drawn with
        ``np.random.default_rng(stable_hash(key))``, so the same on every worker and rerun."""
        templates = self.families.get(family)
        if not templates:
            return None
        rng = np.random.default_rng(stable_hash(str(key)))
        return templates[int(rng.integers(len(templates)))]


def _placeholders(text: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]


def parse_templates(doc: Mapping[str, Any]) -> TemplateSet:
    """A :class:`TemplateSet` from the JSON document, checked: every placeholder known, every
    part one field with its own placeholder, separators from :data:`SEPARATORS`."""
    families: dict[str, tuple[Template, ...]] = {}
    for family, items in (doc.get("families") or {}).items():
        if not items:
            raise ValueError(f"template family {family!r} is empty")
        out = []
        for i, t in enumerate(items):
            where = f"templates[{family!r}][{i}]"
            lead, bare = str(t.get("lead", "")), str(t.get("bare", ""))
            unknown = set(_placeholders(lead)) - set(SUBJECTS)
            if unknown or len(_placeholders(lead)) > 1:
                raise ValueError(f"{where}: the lead may hold one of {sorted(SUBJECTS)}: {lead!r}")
            if _placeholders(bare):
                raise ValueError(f"{where}: the bare lead holds a placeholder: {bare!r}")
            parts = []
            for p in t.get("parts", []):
                field, text = str(p[0]), str(p[1])
                sep = str(p[2]) if len(p) > 2 else ", "
                if field not in PART_FIELDS:
                    raise ValueError(f"{where}: unknown field {field!r} (known: {PART_FIELDS})")
                if _placeholders(text) != [field]:
                    raise ValueError(f"{where}: part {text!r} must hold exactly {{{field}}}")
                if sep not in SEPARATORS:
                    raise ValueError(f"{where}: separator {sep!r} is not one of {SEPARATORS}")
                parts.append((field, text, sep))
            if len({f for f, _, _ in parts}) != len(parts):
                raise ValueError(f"{where}: a field appears in two parts")
            out.append(Template(lead, bare, tuple(parts)))
        families[family] = tuple(out)
    return TemplateSet(
        families=families,
        class_names=dict(doc.get("class_names") or {}),
        no_article=frozenset(doc.get("no_article") or ()),
        skip_classes=frozenset(doc.get("skip_classes") or ()),
    )


def load_templates(path: str | None = None) -> TemplateSet:
    """Templates from ``path`` (any Beam filesystem) or the bundled RS3 file."""
    if path is None:
        text = resources.files("pipelines.recipes").joinpath("data", DEFAULT_TEMPLATES).read_text(
            encoding="utf-8")
    else:
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.open(path) as f:
            text = f.read().decode("utf-8")
    return parse_templates(json.loads(text))


# --- field values --------------------------------------------------------------------------


def humanise(label: str, templates: TemplateSet | None = None) -> str:
    """"airport_terminal" → "airport terminal" (an override from the template file wins)."""
    names = templates.class_names if templates else {}
    if label in names:
        return names[label]
    return re.sub(r"\s+", " ", str(label).replace("_", " ")).strip().lower()


def with_article(noun: str, no_article: frozenset[str] = frozenset()) -> str:
    """"an airport terminal", "a dam"; mass nouns and plurals listed in ``no_article`` bare."""
    if not noun or noun in no_article:
        return noun
    low = noun.lower()
    vowel = low[0] in "aeiou" and not low.startswith(("uni", "use", "usu", "eu", "one"))
    return ("an " if vowel or low.startswith(("hour", "honest")) else "a ") + noun


def join_labels(labels: Sequence[str]) -> str:
    """["a", "b", "c"] → "a, b and c"."""
    labels = list(labels)
    if len(labels) <= 1:
        return "".join(labels)
    return ", ".join(labels[:-1]) + " and " + labels[-1]


def place_phrase(city: str | None, region: str | None, country: str | None) -> str | None:
    """"near Exmore, Virginia, United States", "in Virginia, United States", "in Switzerland",
    "in the United States"; a name repeated by the next one ("Singapore, Singapore") once."""
    names: list[str] = []
    for n in (city, region, country):
        if n and (not names or names[-1] != n):
            names.append(n)
    if not names:
        return None
    if city:
        return "near " + ", ".join(names)
    if region:
        return "in " + ", ".join(names)
    article = country_article(country)
    return f"in {article + ' ' if article else ''}{country}"


def gsd_phrase(gsd_m: float) -> str:
    """0.5 → "0.5 m", 1.24 → "1.2 m", 10.0 → "10 m"."""
    return f"{round(gsd_m):d} m" if gsd_m >= 10 else f"{gsd_m:.2g} m"


def cloud_phrase(percent: float) -> str:
    if percent <= 0:
        return "no cloud cover"
    if percent < 0.5:
        return "under 1% cloud cover"
    return f"{round(percent):d}% cloud cover"


def off_nadir_phrase(degrees: float) -> str:
    n = round(degrees)
    if n < 1:
        return "at nadir"
    return f"{n} degree{'s' if n != 1 else ''} off nadir"


def time_phrase(hour_utc: float, lon: float) -> str:
    """The time of day by local mean solar time (UTC + lon/15 h: the sun's time, which is what
    the picture shows, not the civil time zone)."""
    h = (hour_utc + lon / 15.0) % 24.0
    if 5 <= h < 11:
        return "in the morning"
    if 11 <= h < 13:
        return "around midday"
    if 13 <= h < 17:
        return "in the afternoon"
    if 17 <= h < 21:
        return "in the evening"
    return "at night"


def _float(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def meta_fields(record: dict[str, Any], family: str,
                templates: TemplateSet | None = None) -> dict[str, Any]:
    """The metadata fields of ``record`` as caption phrases (absent fields left out).

    fmow: class (``labels[0]``, humanised; ``false_detection`` names no class), place, season,
    date, time, gsd, utm_zone, position, cloud_cover, off_nadir; bigearthnet: labels (all,
    lowercased) and the same time and place fields (the templates use season, date and utm
    zone); millionaid: class (the leaf of the class path, ``labels[-1]``; the test split has
    none).
    """
    templates = templates or TemplateSet(families={})
    out: dict[str, Any] = {}
    labels = [str(x) for x in (record.get("labels") or []) if x]
    if family == "bigearthnet":
        if labels:
            out["labels"] = [humanise(x, templates) for x in labels]
    elif labels:
        raw = labels[-1] if family == "millionaid" else labels[0]
        if raw not in templates.skip_classes:
            out["class"] = humanise(raw, templates)
    for name in PLACE_FIELDS:
        if record.get(name):
            out[name] = str(record[name])
    if record.get("season"):
        out["season"] = str(record["season"])
    when = parse_acquired(record.get("acquired"))
    if when is not None:
        out["date"] = f"{MONTHS[when.month - 1]} {when.year}"
        lon = _float(record.get("lon"))
        if has_time(record.get("acquired")) and lon is not None:
            out["time"] = time_phrase(when.hour + when.minute / 60.0, lon)
    gsd = _float(record.get("gsd_m"))
    if gsd is not None and gsd > 0:
        out["gsd"] = gsd_phrase(gsd)
    if record.get("utm_zone"):
        out["utm_zone"] = str(record["utm_zone"])
    if record.get("target_position") in POSITION_PHRASES:
        out["position"] = POSITION_PHRASES[record["target_position"]]
    cloud = _float(record.get("cloud_cover"))
    if cloud is not None and 0 <= cloud <= 100:
        out["cloud_cover"] = cloud_phrase(cloud)
    nadir = _float(record.get("off_nadir_deg"))
    if nadir is not None and 0 <= nadir <= 90:
        out["off_nadir"] = off_nadir_phrase(nadir)
    return out


# --- rendering and fitting -----------------------------------------------------------------


def _sentence_case(text: str) -> str:
    """Capital letter at the start and after each ". "; a full stop at the end."""
    text = re.sub(r"(^|\. )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)
    return text if text.endswith((".", "!", "?")) else text + "."


def render(fields: Mapping[str, Any], template: Template,
           no_article: frozenset[str] = frozenset()) -> str:
    """The meta sentence of ``fields`` with ``template``; "" when it renders no field (a lead
    alone, "A satellite image.", says nothing about this image)."""
    pieces: list[tuple[str, str]] = []
    for field, text, sep in template.parts:
        if field == "place":
            value = place_phrase(*(fields.get(n) for n in PLACE_FIELDS))
        else:
            value = fields.get(field)
        if value:
            pieces.append((sep, text.format(**{field: value})))
    subject = _placeholders(template.lead)
    value = fields.get(SUBJECTS[subject[0]]) if subject else None
    if value:
        text = template.lead.format(**{
            "a_class": with_article(value, no_article) if subject[0] == "a_class" else "",
            "class": value if subject[0] == "class" else "",
            "labels": join_labels(value) if subject[0] == "labels" else "",
        })
    elif not pieces:
        return ""
    else:
        text = template.lead if not subject else template.bare
    for sep, piece in pieces:
        text = f"{text}{sep}{piece}" if text else piece
    return _sentence_case(text.strip())


@dataclasses.dataclass(frozen=True)
class FittedCaption:
    caption: str  # meta + " " + generated, or either alone
    meta: str  # the meta sentence as fitted ("" when every field was dropped or none was set)
    dropped: tuple[str, ...]  # fields dropped to fit, in the order dropped
    tokens: int  # count_tokens(caption)


def _next_drop(current: dict[str, Any], renders: frozenset[str],
               priority: Sequence[str]) -> tuple[str, str] | None:
    """(field, meta_dropped entry) of the next step, applied to ``current`` in place."""
    for name in priority:
        if name not in current or name not in renders:
            continue
        if name == "labels" and len(current["labels"]) > 1:
            current["labels"] = current["labels"][:-1]
            return name, f"labels[{len(current['labels'])}:]"
        del current[name]
        return name, name
    return None


def fit_caption(
    fields: Mapping[str, Any],
    template: Template | None,
    generated: str | None,
    count_tokens: Callable[[str], int],
    context_length: int,
    no_article: frozenset[str] = frozenset(),
    priority: Sequence[str] = DROP_PRIORITY,
) -> FittedCaption | Reject:
    """``meta + " " + generated`` with ``count_tokens(caption) <= context_length``.

    Fields are dropped in ``priority`` order (only those the template renders) until the
    caption fits; the generated caption is never cut. ``generated`` that does not fit alone →
    ``Reject("meta_caption", "generated_too_long")``. ``template=None`` → no meta sentence.
    """
    generated = (generated or "").strip()
    alone = count_tokens(generated)
    if alone > context_length:
        return Reject(STAGE, "generated_too_long",
                      f"{alone} tokens alone, context {context_length}", float(alone))
    current = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in fields.items()
               if v not in (None, "", [], ())}
    renders = template.fields() if template is not None else frozenset()
    dropped: list[str] = []
    while True:
        meta = render(current, template, no_article) if template is not None else ""
        caption = f"{meta} {generated}" if meta and generated else (meta or generated)
        n = count_tokens(caption)
        if n <= context_length:
            return FittedCaption(caption, meta, tuple(dropped), n)
        step = _next_drop(current, renders, priority)
        if step is None:  # nothing left that the template renders: the generated part alone
            return FittedCaption(generated, "", tuple(dropped), alone)
        field, entry = step
        if field == "labels" and dropped and dropped[-1].startswith("labels["):
            dropped[-1] = entry  # one entry for the shortened list: the latest cut
        else:
            dropped.append(entry)


# --- token counting ------------------------------------------------------------------------


def token_counter(tokenizer: Any) -> Callable[[str], int]:
    """A function giving the number of tokens ``tokenizer([text])`` holds before it truncates,
    start and end (and any other special) tokens included.

    SimpleTokenizer: ``[sot] + encode(text) + [eot]`` (``encode`` applies the tokenizer's own
    ``clean_fn``); HFTokenizer: its HF tokenizer on ``clean_fn(text)`` without truncation
    (``clips`` mode: the text tokens + bos, eos and the class token).
    """
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "eot_token_id"):
        encode = tokenizer.encode
        return lambda text: len(encode(text)) + 2
    inner, clean = getattr(tokenizer, "tokenizer", None), getattr(tokenizer, "clean_fn", None)
    if inner is not None and clean is not None and type(tokenizer).__name__ == "HFTokenizer":
        if getattr(tokenizer, "tokenizer_mode", "") == "clips":
            return lambda text: len(inner(clean(text), add_special_tokens=False)["input_ids"]) + 3
        return lambda text: len(inner(clean(text), truncation=False)["input_ids"])
    raise TypeError(f"cannot count tokens for a {type(tokenizer).__name__}; supported: "
                    "open_clip SimpleTokenizer and HFTokenizer")


# --- the stage -----------------------------------------------------------------------------


def family_of(record: dict[str, Any]) -> str | None:
    return FAMILY_OF_SOURCE.get(str(record.get("source") or ""))


def meta_caption(
    record: dict[str, Any],
    templates: TemplateSet,
    count_tokens: Callable[[str], int],
    context_length: int,
) -> dict[str, Any] | Reject:
    """``record`` with caption, captions, caption_kind, meta_caption, meta_dropped and
    caption_tokens set, or a Reject.

    caption = the meta sentence fitted with the picked candidate (``generated_pick``);
    captions = [caption] + the meta sentence fitted with each other candidate, in generation
    order (a candidate that is empty or too long on its own is left out: the record keeps its
    primary caption). caption_kind is "meta+blip2", "blip2" when no meta sentence is left, and
    "meta" for a record without generated captions.
    """
    family = family_of(record)
    template = templates.pick(family, record.get("key", "")) if family else None
    fields = meta_fields(record, family or "", templates)
    generated = [str(g or "") for g in (record.get("generated") or [])]
    pick = record.get("generated_pick")
    pick = int(pick) if isinstance(pick, (int, np.integer)) and 0 <= pick < len(generated) else 0
    primary_text = generated[pick] if generated else ""
    primary = fit_caption(fields, template, primary_text, count_tokens, context_length,
                          templates.no_article)
    if isinstance(primary, Reject):
        return primary
    if not primary.caption:
        return Reject(STAGE, "empty_caption", "no generated caption and no metadata")
    captions = [primary.caption]
    for i, text in enumerate(generated):
        if i == pick or not text.strip():
            continue
        other = fit_caption(fields, template, text, count_tokens, context_length,
                            templates.no_article)
        if isinstance(other, FittedCaption):
            captions.append(other.caption)
    out = dict(record)
    out.update(
        caption=primary.caption,
        captions=captions,
        caption_kind=("meta+blip2" if primary.meta else "blip2") if primary_text.strip()
        else "meta",
        meta_caption=primary.meta or None,
        meta_dropped=list(primary.dropped),
        caption_tokens=primary.tokens,
    )
    return out


class MetaCaptionDoFn(CountingDoFn):
    """Record with ``generated``/``generated_pick`` → captioned record, or its reject row."""

    stage = STAGE

    def __init__(self, clip_model: str, templates: TemplateSet) -> None:
        super().__init__()
        self.clip_model = clip_model
        self.templates = templates

    def setup(self) -> None:
        from pipelines.models.open_clip_loader import load_tokenizer

        tokenizer, self._context_length = load_tokenizer(self.clip_model)
        self._count_tokens = token_counter(tokenizer)

    def process(self, record: dict[str, Any]) -> Iterator[Any]:
        result = meta_caption(record, self.templates, self._count_tokens, self._context_length)
        if not isinstance(result, Reject):
            self.count(result["caption_kind"])
            if result["meta_dropped"]:
                self.count("meta_shortened")
        yield from self.emit(record, result)


class MetaCaption(beam.PTransform):
    """Records → ``{"records": captioned records, "rejects": reject rows}``.

    ``clip_model``: the open_clip model (name or local directory, as ``--clip_model``) whose
    tokenizer and context the captions must fit; only its tokenizer is loaded, once per worker.
    ``templates``: a template JSON file (any Beam filesystem), else the bundled RS3 file; read
    and checked here, at pipeline construction, so a broken file fails before any work.
    """

    def __init__(self, clip_model: str, templates: str | None = None) -> None:
        super().__init__()
        if not isinstance(clip_model, str) or not clip_model:
            raise ValueError("clip_model must name an open_clip model or a local directory")
        self.clip_model = clip_model
        self.templates = load_templates(templates)

    def expand(self, records: beam.PCollection) -> Any:
        return records | "MetaCaption" >> beam.ParDo(
            MetaCaptionDoFn(self.clip_model, self.templates)
        ).with_outputs(REJECTS, main=MAIN)
