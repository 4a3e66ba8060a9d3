"""Meta captions: templates, fitting to CLIP's context with the real tokenizer, the Beam stage."""

from __future__ import annotations

import json
import re

import apache_beam as beam
import numpy as np
import open_clip
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.models.open_clip_loader import load_tokenizer
from pipelines.records import REJECTS, Reject
from pipelines.stages import meta_captions as mc
from pipelines.stages.georef import GRID, country_name, towns
from pipelines.stages.meta_captions import (
    DROP_PRIORITY,
    FittedCaption,
    MetaCaption,
    fit_caption,
    load_templates,
    meta_caption,
    meta_fields,
    parse_templates,
    place_phrase,
    render,
    token_counter,
)

CONTEXT = 77
FMOW_CLASSES = [
    "airport", "airport_hangar", "airport_terminal", "amusement_park", "aquaculture",
    "archaeological_site", "barn", "border_checkpoint", "burial_site", "car_dealership",
    "construction_site", "crop_field", "dam", "debris_or_rubble", "educational_institution",
    "electric_substation", "factory_or_powerplant", "fire_station", "flooded_road", "fountain",
    "gas_station", "golf_course", "ground_transportation_station", "helipad", "hospital",
    "impoverished_settlement", "interchange", "lake_or_pond", "lighthouse", "military_facility",
    "multi-unit_residential", "nuclear_powerplant", "office_building", "oil_or_gas_facility",
    "park", "parking_lot_or_garage", "place_of_worship", "police_station", "port", "prison",
    "race_track", "railway_bridge", "recreational_facility", "road_bridge", "runway", "shipyard",
    "shopping_mall", "single-unit_residential", "smokestack", "solar_farm", "space_facility",
    "stadium", "storage_tank", "surface_mine", "swimming_pool", "toll_booth", "tower",
    "tunnel_opening", "waste_disposal", "water_treatment_facility", "wind_farm", "zoo",
]
WORDS = [
    "a", "large", "building", "with", "parking", "lot", "next", "to", "road", "and", "trees", "in",
    "the", "middle", "of", "field", "several", "cars", "parked", "along", "street", "aerial",
    "view", "of", "city", "residential", "area", "river", "bridge", "over", "water", "white",
    "roof", "houses", "surrounded", "by", "green", "grass",
]
CONNECTORS = {"of", "in", "at", "with", "near", "by", "taken", "from", "during", "located",
              "seen", "viewed", "captured", "acquired", "imaged", "dated", "shot", "looking",
              "the", "a", "an", "and", "target", "lies"}
PLACE_ONLY = {"city", "region", "country"}  # rendered together: the phrase changes, not vanishes


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")  # bundled BPE vocabulary: no download


@pytest.fixture(scope="module")
def count(tokenizer):
    return token_counter(tokenizer)


@pytest.fixture(scope="module")
def templates():
    return load_templates()


def _fmow_record(key="k1", generated=None, **over):
    rec = {
        "key": key, "source": "fmow-rgb", "labels": ["airport_terminal"],
        "city": "Exmore", "region": "Virginia", "country": "United States", "season": "summer",
        "acquired": "2016-06-13T15:12:31Z", "lat": 37.55, "lon": -75.82, "gsd_m": 0.5123,
        "utm_zone": "18N", "target_position": "top left", "cloud_cover": 3.0,
        "off_nadir_deg": 12.3,
        "generated": generated or ["a large building with a parking lot next to it",
                                   "an airport with planes on the runway", "a building"],
        "generated_pick": 0,
    }
    rec.update(over)
    return rec


def _long_fields():
    """Every fMoW field, with a long place."""
    return {
        "class": "ground transportation station", "city": "Llanfairpwllgwyngyll",
        "region": "Wales", "country": "United Kingdom", "season": "autumn",
        "date": "September 2016", "time": "in the morning", "gsd": "0.31 m",
        "utm_zone": "30N", "position": "in the bottom right of the image",
        "cloud_cover": "47% cloud cover", "off_nadir": "27 degrees off nadir",
    }


def _generated_of(count, n_tokens: int) -> str:
    """A BLIP-2-like caption of exactly ``n_tokens`` tokens (start and end included)."""
    words = [

    ]
    rng = np.random.default_rng(n_tokens)
    while count(" ".join(words)) < n_tokens:
        words.append(str(rng.choice(WORDS)))
    while count(" ".join(words)) > n_tokens:
        words.pop()
    text = " ".join(words)
    while count(text) < n_tokens:
        text += " a"
    assert count(text) == n_tokens
    return text


def _assert_not_truncated(tokenizer, caption: str, n: int) -> None:
    """``tokenizer([caption])`` holds [sot] + every token of caption + [eot] within the context."""
    row = tokenizer([caption])[0].tolist()
    expected = [tokenizer.sot_token_id, *tokenizer.encode(caption), tokenizer.eot_token_id]
    assert len(expected) == n <= CONTEXT
    assert row[:n] == expected and all(t == 0 for t in row[n:])


# --- templates -----------------------------------------------------------------------------


def test_bundled_families_hold_at_least_20_templates(templates):
    for family in ("fmow", "bigearthnet", "millionaid"):
        assert len(templates.families[family]) >= 20, family
        assert len(set(templates.families[family])) == len(templates.families[family])


def test_every_fmow_template_renders_every_field(templates):
    fields = _long_fields()
    for t in templates.families["fmow"]:
        text = render(fields, t, templates.no_article)
        for name in ("season", "date", "gsd", "utm_zone", "position", "cloud_cover",
                     "off_nadir", "city", "region", "country"):
            assert fields[name] in text, (name, text)
        assert "ground transportation station" in text.lower()
        assert "{" not in text and text[0].isupper() and text.endswith(".")


def _assert_clean(text: str) -> None:
    assert "  " not in text and ",," not in text and ", ." not in text and " ," not in text
    assert ".." not in text and ". ," not in text and not re.search(r"[,;] *\.", text)
    last = re.findall(r"[A-Za-z']+", text)[-1].lower()
    assert last not in CONNECTORS, text
    assert text[0].isupper() and text.endswith(".")


def test_dropping_any_field_leaves_no_dangling_words(templates):
    for family, fields in (("fmow", _long_fields()),
                           ("bigearthnet", {"labels": ["pastures", "water bodies"],
                                            "season": "winter", "date": "January 2018",
                                            "utm_zone": "33N"})):
        for t in templates.families[family]:
            for name in t.fields() - {"class", "labels"}:
                for keep in (set(fields) - {name}, {"class", "labels", name}):
                    text = render({k: v for k, v in fields.items() if k in keep}, t,
                                  templates.no_article)
                    _assert_clean(text)
                    if name in PLACE_ONLY:
                        continue
                    if name not in keep:
                        assert str(fields[name]) not in text


def test_place_phrases():
    assert place_phrase("Exmore", "Virginia", "United States") == \
        "near Exmore, Virginia, United States"
    assert place_phrase(None, "Virginia", "United States") == "in Virginia, United States"
    assert place_phrase(None, None, "Switzerland") == "in Switzerland"
    assert place_phrase(None, None, "United States") == "in the United States"
    assert place_phrase("Singapore", "Singapore", "Singapore") == "near Singapore"
    assert place_phrase(None, None, None) is None


def test_fields_from_a_record(templates):
    f = meta_fields(_fmow_record(), "fmow", templates)
    assert f == {
        "class": "airport terminal", "city": "Exmore", "region": "Virginia",
        "country": "United States", "season": "summer", "date": "June 2016",
        "time": "in the morning",  # 15:12 UTC at 75.8W is 10:09 local solar time
        "gsd": "0.51 m", "utm_zone": "18N", "position": "in the top left of the image",
        "cloud_cover": "3% cloud cover", "off_nadir": "12 degrees off nadir",
    }
    assert "class" not in meta_fields(_fmow_record(labels=["false_detection"]), "fmow",
                                      templates)
    ben = meta_fields({"labels": ["Pastures", "Broad-leaved forest"], "acquired":
                       "2017-06-13T10:10:31", "utm_zone": "33N"}, "bigearthnet", templates)
    assert ben["labels"] == ["pastures", "broad-leaved forest"] and ben["date"] == "June 2017"
    mill = meta_fields({"labels": ["agriculture_land", "arable_land", "dry_field"]},
                       "millionaid", templates)
    assert mill == {"class": "dry field"}


def test_same_key_same_template(templates):
    picks = [templates.pick("fmow", f"key-{i}") for i in range(400)]
    assert picks == [templates.pick("fmow", f"key-{i}") for i in range(400)]
    assert len(set(picks)) >= 18  # the draw spreads over the family
    assert templates.pick("nope", "key-1") is None


@pytest.mark.parametrize("bad", [
    {"families": {"fmow": [{"lead": "{a_class}", "bare": "", "parts": [["colour", "{colour}"]]}]}},
    {"families": {"fmow": [{"lead": "{a_class}", "bare": "",
                            "parts": [["date", "in {date} {season}"]]}]}},
    {"families": {"fmow": [{"lead": "{a_class}", "bare": "", "parts": [["date", "in {date}",
                                                                       " - "]]}]}},
    {"families": {"fmow": [{"lead": "{thing}", "bare": "", "parts": []}]}},
    {"families": {"fmow": [{"lead": "{a_class}", "bare": "{a_class}", "parts": []}]}},
    {"families": {"fmow": []}},
])
def test_broken_template_files_are_refused(bad):
    with pytest.raises(ValueError):
        parse_templates(bad)


def test_stage_reads_a_template_file(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"families": {"fmow": [
        {"lead": "Picture of {a_class}", "bare": "Picture", "parts": [["date", "in {date}"]]}]}}))
    stage = MetaCaption("ViT-B-32", templates=str(path))
    t = stage.templates.pick("fmow", "x")
    assert render({"class": "dam", "date": "June 2016"}, t) == "Picture of a dam, in June 2016."
    path.write_text(json.dumps({"families": {"fmow": [{"lead": "{x}", "parts": []}]}}))
    with pytest.raises(ValueError):
        MetaCaption("ViT-B-32", templates=str(path))


# --- fitting -------------------------------------------------------------------------------


def _priority_index(entry: str) -> int:
    return DROP_PRIORITY.index("labels" if entry.startswith("labels") else entry)


def test_long_metadata_and_40_token_caption_fit_77(templates, tokenizer, count):
    generated = _generated_of(count, 40)
    fields = _long_fields()
    for t in templates.families["fmow"]:
        full = render(fields, t, templates.no_article) + " " + generated
        assert count(full) > CONTEXT  # RS5M's caption would have been truncated
        fc = fit_caption(fields, t, generated, count, CONTEXT, templates.no_article)
        assert isinstance(fc, FittedCaption)
        assert fc.tokens == count(fc.caption) <= CONTEXT
        assert fc.caption == f"{fc.meta} {generated}"  # the generated part is its exact suffix
        _assert_not_truncated(tokenizer, fc.caption, fc.tokens)
        assert fc.dropped and "class" not in fc.dropped  # room was left for the class
        assert "ground transportation station" in fc.meta.lower()
        order = [_priority_index(d) for d in fc.dropped]
        assert order == sorted(order)  # dropped in the documented priority
        assert list(fc.dropped) == [d for d in DROP_PRIORITY if d in fc.dropped]
        # minimal: keeping the last dropped field would not have fitted
        kept = {k: v for k, v in fields.items() if k not in fc.dropped[:-1]}
        assert count(render(kept, t, templates.no_article) + " " + generated) > CONTEXT
        _assert_clean(fc.meta)


def test_bigearthnet_labels_shorten_before_they_go(templates, tokenizer, count):
    labels = [
        "non-irrigated arable land",
        "land principally occupied by agriculture, with significant areas of natural vegetation",
        "complex cultivation patterns",
        "annual crops associated with permanent crops",
        "fruit trees and berry plantations",
        "broad-leaved forest",
        "coniferous forest",
        "mixed forest",
        "transitional woodland/shrub",
        "water courses",
        "pastures",
    ]
    fields = {"labels": labels, "season": "spring", "date": "April 2018", "utm_zone": "34N"}
    generated = _generated_of(count, 40)
    for t in templates.families["bigearthnet"]:
        fc = fit_caption(fields, t, generated, count, CONTEXT)
        assert fc.tokens <= CONTEXT and fc.caption.endswith(" " + generated)
        _assert_not_truncated(tokenizer, fc.caption, fc.tokens)
        assert fc.dropped[:3] == ("utm_zone", "date", "season")
        m = re.fullmatch(r"labels\[(\d+):\]", fc.dropped[-1])
        assert m and 1 <= int(m[1]) < len(labels)
        kept = labels[:int(m[1])]
        assert mc.join_labels(kept) in fc.meta.lower() and labels[int(m[1])] not in fc.meta


def test_generated_caption_too_long_is_rejected(count, templates):
    t = templates.families["fmow"][0]
    too_long = _generated_of(count, CONTEXT + 1)
    got = fit_caption(_long_fields(), t, too_long, count, CONTEXT)
    assert isinstance(got, Reject)
    assert (got.stage, got.reason) == ("meta_caption", "generated_too_long")
    # exactly the context: it fits alone, every field dropped, class last
    exact = _generated_of(count, CONTEXT)
    fc = fit_caption(_long_fields(), t, exact, count, CONTEXT)
    assert fc.caption == exact and fc.meta == "" and fc.tokens == CONTEXT
    assert fc.dropped[-1] == "class" and len(fc.dropped) == len(t.fields() & set(_long_fields()))


def test_short_captions_keep_every_field(count, templates):
    fields = {"class": "dam", "season": "summer", "utm_zone": "18N"}
    t = templates.families["fmow"][0]
    fc = fit_caption(fields, t, "a dam on a river", count, CONTEXT)
    assert fc.dropped == () and fc.caption == "A satellite image of a dam, in summer, " \
        "in UTM zone 18N. a dam on a river"


def test_rs5m_flaw_measured(templates, count):
    """The figures in the module docstring: share of fMoW-like captions over 77 tokens with
    every field kept, and after fitting (must be 0)."""
    rng = np.random.default_rng(0)
    geo = towns()
    full, fitted, meta_alone, drops = [], [], [], []
    for i in range(400):
        j = int(rng.integers(len(geo.city)))
        r = rng.random()
        rec = {
            "key": f"fmow-{i}", "source": "fmow-rgb",
            "labels": [FMOW_CLASSES[int(rng.integers(len(FMOW_CLASSES)))]],
            "city": geo.city[j] if r < 0.7 else None,
            "region": geo.region[j] if r < 0.9 else None,
            "country": country_name(geo.country_code[j]),
            "season": ["winter", "spring", "summer", "autumn"][int(rng.integers(4))],
            "acquired": f"{int(rng.integers(2002, 2018))}-{int(rng.integers(1, 13)):02d}-15T"
                        f"{int(rng.integers(0, 24)):02d}:20:00Z",
            "lon": float(geo.lon[j]), "gsd_m": float(rng.uniform(0.3, 2.0)),
            "utm_zone": f"{int(rng.integers(1, 61))}{'NS'[int(rng.integers(2))]}",
            "target_position": GRID[int(rng.integers(3))][int(rng.integers(3))],
            "cloud_cover": float(rng.integers(0, 100)),
            "off_nadir_deg": float(rng.uniform(0, 40)),
        }
        generated = " ".join(rng.choice(WORDS, int(rng.integers(8, 31))))
        fields = meta_fields(rec, "fmow", templates)
        t = templates.pick("fmow", rec["key"])
        meta = render(fields, t, templates.no_article)
        meta_alone.append(count(meta))
        full.append(count(f"{meta} {generated}"))
        fc = fit_caption(fields, t, generated, count, CONTEXT, templates.no_article)
        fitted.append(fc.tokens)
        drops.append(len(fc.dropped))
        assert fc.caption.endswith(generated)
    before = float(np.mean(np.array(full) > CONTEXT))
    after = float(np.mean(np.array(fitted) > CONTEXT))
    print(f"over {CONTEXT} tokens: {before:.1%} with every field (mean {np.mean(full):.0f}, "
          f"meta {np.mean(meta_alone):.0f}), {after:.1%} fitted (mean {np.mean(fitted):.0f}, "
          f"{np.mean(drops):.1f} fields dropped)")
    assert after == 0.0
    documented = float(re.search(r"\*\*([\d.]+)%\*\* of captions", mc.__doc__)[1]) / 100
    assert before == pytest.approx(documented, abs=0.03)
    assert before > 0.5


# --- records and the stage -----------------------------------------------------------------


def test_record_captions_follow_generation_order(templates, count):
    rec = _fmow_record(generated_pick=1)
    out = meta_caption(rec, templates, count, CONTEXT)
    gen = rec["generated"]
    assert out["caption"].endswith(" " + gen[1])
    assert [c.rsplit(". ", 1)[-1] for c in out["captions"]] == [gen[1], gen[0], gen[2]]
    assert out["caption_kind"] == "meta+blip2"
    assert out["caption"] == f"{out['meta_caption']} {gen[1]}"
    assert out["caption_tokens"] == count(out["caption"]) <= CONTEXT
    assert out["meta_dropped"] == []
    assert rec.get("caption") is None  # the input record is not modified


def test_a_too_long_other_candidate_is_left_out(templates, count):
    long = _generated_of(count, CONTEXT + 5)
    out = meta_caption(_fmow_record(generated=["a dam", long, "a lake"]), templates, count,
                       CONTEXT)
    assert len(out["captions"]) == 2 and out["captions"][1].endswith(" a lake")
    got = meta_caption(_fmow_record(generated=[long, "a dam"]), templates, count, CONTEXT)
    assert isinstance(got, Reject) and got.reason == "generated_too_long"


def test_millionaid_test_split_gets_the_generated_caption_alone(templates, count):
    rec = {"key": "m1", "source": "millionaid", "labels": None,
           "generated": ["a river next to a road"], "generated_pick": 0}
    out = meta_caption(rec, templates, count, CONTEXT)
    assert out["caption"] == "a river next to a road" and out["caption_kind"] == "blip2"
    assert out["meta_caption"] is None and out["meta_dropped"] == []
    train = meta_caption({**rec, "labels": ["water_area", "river"]}, templates, count, CONTEXT)
    assert "river" in train["meta_caption"] and train["caption_kind"] == "meta+blip2"


def test_beam_stage(tmp_path):
    long = "a " * 90
    records = [_fmow_record("a"), _fmow_record("b", generated=[long.strip()]),
               {"key": "c", "source": "millionaid", "generated": ["a river"],
                "generated_pick": 0}]
    with TestPipeline() as p:
        out = p | beam.Create(records) | MetaCaption("ViT-B-32")
        assert_that(out.records | "Kinds" >> beam.Map(
            lambda r: (r["key"], r["caption_kind"], r["caption_tokens"] <= 77)),
            equal_to([("a", "meta+blip2", True), ("c", "blip2", True)]), label="records")
        assert_that(out[REJECTS] | "Reasons" >> beam.Map(
            lambda r: (r["key"], r["stage"], r["reason"])),
            equal_to([("b", "meta_caption", "generated_too_long")]), label="rejects")


# --- tokenizers ----------------------------------------------------------------------------


def test_load_tokenizer_reads_no_weights(tmp_path):
    tok, ctx = load_tokenizer("ViT-B-32")
    assert ctx == 77 and isinstance(tok, open_clip.tokenizer.SimpleTokenizer)
    d = tmp_path / "short-ctx"
    d.mkdir()
    cfg = open_clip.get_model_config("RS-Tiny-ViT")
    cfg = {**cfg, "text_cfg": {**cfg["text_cfg"], "context_length": 32}}
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg,
                                                         "preprocess_cfg": {}}))
    tok, ctx = load_tokenizer(str(d))  # a directory without any weights file
    assert ctx == 32 and tok.context_length == 32
    assert load_tokenizer(f"local-dir:{d}")[1] == 32
    for bad in ("hf-hub:org/model", "https://example.com/x", "ViT-B-16-SigLIP", "no-such-model"):
        with pytest.raises(ValueError):
            load_tokenizer(bad)


def test_fitting_to_a_shorter_context(tmp_path, templates):
    """A model with a 32-token context: captions fit 32, not 77."""
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=32)
    count = token_counter(tok)
    fc = fit_caption(_long_fields(), templates.families["fmow"][0], "a dam on a river", count, 32)
    assert fc.tokens <= 32 and fc.caption.endswith("a dam on a river")
    row = tok([fc.caption])[0].tolist()
    assert row[:fc.tokens] == [tok.sot_token_id, *tok.encode(fc.caption), tok.eot_token_id]


def test_hf_tokenizer_counting(tmp_path):
    """open_clip's HFTokenizer: counted through its HF tokenizer, special tokens included."""
    pytest.importorskip("transformers")
    from open_clip.tokenizer import HFTokenizer
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["a", "an", "of", "in", "near", "satellite", "image", "airport", "terminal", "dam",
             "river", "road", ",", ".", "june", "2016", "summer", "utm", "zone"]
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                            cls_token="[CLS]", sep_token="[SEP]").save_pretrained(tmp_path)
    tok = HFTokenizer(str(tmp_path), context_length=12)
    count = token_counter(tok)
    text = "a satellite image of an airport terminal near a river, june 2016"
    assert count(text) == 15  # 13 words and signs + [CLS] + [SEP]
    t = mc.Template("A satellite image of {a_class}", "A satellite image",
                    (("date", "in {date}", ", "), ("season", "in {season}", ", ")))
    fc = fit_caption({"class": "dam", "date": "June 2016", "season": "summer"}, t, "a river",
                     count, 12)
    assert fc.dropped == ("date", "season") and fc.tokens == count(fc.caption) == 11
    assert fc.caption == "A satellite image of a dam. a river"
    row = tok([fc.caption])[0].tolist()
    assert row[fc.tokens - 1] == 3 and row[fc.tokens:] == [0] * (12 - fc.tokens)  # SEP kept
    with pytest.raises(TypeError):
        token_counter(object())
