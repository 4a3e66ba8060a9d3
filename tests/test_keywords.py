import pytest

from pipelines.records import Reject
from pipelines.stages.keywords import KeywordFilter

KW = KeywordFilter.parse(
    """# comment
satellite
remote sensing
bird's eye
-satellite dish
"""
)


def rec(caption):
    return {"key": "k", "caption": caption}


@pytest.mark.parametrize(
    "caption,term",
    [
        ("A SATELLITE image of Paris", "satellite"),
        ("remote sensing of crops", "remote sensing"),
        ("remote-sensing of crops", "remote-sensing"),
        ("remote\n sensing scene", "remote\n sensing"),
        ("bird's eye view", "bird's eye"),
    ],
)
def test_terms_match_whole_words_case_insensitively(caption, term):
    assert KW.match(caption) == term
    assert KW(rec(caption)) == rec(caption)


@pytest.mark.parametrize("caption", ["satellites are cool", "remotesensing", "unsatellite", ""])
def test_partial_words_do_not_match(caption):
    out = KW(rec(caption))
    assert isinstance(out, Reject) and out.reason == "no_keyword" and out.stage == "keywords"


def test_exclusion_beats_term():
    out = KW(rec("Satellite dish on a satellite image"))
    assert isinstance(out, Reject)
    assert out.reason == "excluded_phrase" and out.detail == "satellite dish"


def test_bundled_list_loads_and_has_exclusions():
    kw = KeywordFilter.load()
    assert kw.match("Aerial view of an airport") is not None
    assert kw.match("a cat on a sofa") is None
    assert isinstance(kw(rec("a satellite dish on a roof")), Reject)


def test_empty_file_is_an_error():
    with pytest.raises(ValueError):
        KeywordFilter.parse("# nothing\n-only exclusions\n")
