import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.records import DUPLICATES
from pipelines.stages.dedup import (
    DedupByContent,
    DedupByUrl,
    band_keys,
    bucket_edges,
    components,
    hamming,
    node_of,
    normalise_url,
)


def rec(key, sha, phash, w=100, h=100, nbytes=1000, url=None):
    return {
        "key": key, "subset": "pub11", "source": "s", "source_id": key, "url": url,
        "sha256": sha, "phash": f"{phash:016x}", "original_width": w, "original_height": h,
        "_original_bytes": nbytes,
    }


@pytest.mark.parametrize("t", [1, 3, 4, 6, 8])
def test_bands_find_every_pair_within_threshold(t):
    import random

    rnd = random.Random(t)
    for _ in range(300):
        a = rnd.getrandbits(64)
        flips = rnd.sample(range(64), rnd.randint(0, t))
        b = a
        for f in flips:
            b ^= 1 << f
        assert hamming(a, b) <= t
        assert set(band_keys(a, t)) & set(band_keys(b, t)), "pigeonhole violated"


def test_components_pick_the_best_ranked_survivor_of_a_chain():
    a = node_of(rec("a", "1", 0b0000, w=50))
    b = node_of(rec("b", "2", 0b0001, w=200))  # largest: survivor
    c = node_of(rec("c", "3", 0b0011, w=100))
    d = node_of(rec("d", "4", 0b0111, w=100, nbytes=2000))
    out = components([(a, b), (b, c), (c, d)])
    assert {k: s.key for k, (_, s) in out.items()} == {"a": "b", "c": "b", "d": "b"}


def test_normalise_url():
    assert normalise_url(" HTTP://Example.COM/A.jpg ") == "http://example.com/A.jpg"


def test_url_dedup_keeps_smallest_key():
    rows = [rec("k2", "x", 1, url="http://h/a"), rec("k1", "y", 2, url="HTTP://h/a"),
            rec("k3", "z", 3, url="http://h/b")]
    with TestPipeline() as p:
        out = p | beam.Create(rows) | DedupByUrl()
        assert_that(out.records | "K" >> beam.Map(lambda r: r["key"]), equal_to(["k1", "k3"]))
        assert_that(
            out[DUPLICATES] | "D" >> beam.Map(lambda d: (d["key"], d["duplicate_of"], d["method"])),
            equal_to([("k2", "k1", "url")]),
            label="dups",
        )


def test_content_dedup_sha_and_phash_with_survivor_rule():
    base = 0x0F0F_F0F0_1234_ABCD
    rows = [
        rec("a", "sha-1", base, w=256, h=256, nbytes=5000),  # original
        rec("b", "sha-1", base, w=256, h=256, nbytes=5000),  # same bytes
        rec("c", "sha-2", base ^ 0b101, w=256, h=256, nbytes=3000),  # recompressed
        rec("d", "sha-3", base ^ (1 << 40), w=180, h=180, nbytes=4000),  # resized
        rec("e", "sha-4", ~base & (2**64 - 1), w=256, h=256),  # unrelated
        rec("f", "sha-5", base ^ 0xFFFF, w=256, h=256),  # 16 bits away: different
    ]
    with TestPipeline() as p:
        out = p | beam.Create(rows) | DedupByContent(max_hamming=4)
        assert_that(
            out["records"] | "K" >> beam.Map(lambda r: r["key"]), equal_to(["a", "e", "f"])
        )
        assert_that(
            out[DUPLICATES]
            | "D" >> beam.Map(lambda d: (d["key"], d["duplicate_of"], d["method"],
                                         round(d["similarity"], 4))),
            equal_to([
                ("b", "a", "sha256", 1.0),
                ("c", "a", "phash", round(1 - 2 / 64, 4)),
                ("d", "a", "phash", round(1 - 1 / 64, 4)),
            ]),
            label="dups",
        )


def _decoded_record(key, data):
    from pipelines.stages.images import normalise_image

    res = normalise_image(data)
    r = rec(key, res.sha256, int(res.phash, 16), w=res.original_width, h=res.original_height,
            nbytes=len(data))
    r["_phash_crops"] = res.phash_crops
    return r


@pytest.fixture(scope="module")
def scene_and_crop():
    import io

    import numpy as np

    from pipelines.demo.scenes import CLASSES, render_scene

    img = render_scene(CLASSES[0], np.random.default_rng(7), 256)[0]

    def jpeg(im):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        return buf.getvalue()

    other = render_scene(CLASSES[1], np.random.default_rng(8), 256)[0]
    return [_decoded_record("orig", jpeg(img)),
            _decoded_record("crop", jpeg(img.crop((13, 13, 243, 243)))),  # 5% a side
            _decoded_record("other", jpeg(other))]


def test_centre_crop_is_a_phash_crop_duplicate_of_its_original(scene_and_crop):
    orig, crop, _ = scene_and_crop
    assert hamming(int(orig["phash"], 16), int(crop["phash"], 16)) > 4  # full hash misses it
    with TestPipeline() as p:
        out = p | beam.Create(scene_and_crop) | DedupByContent(max_hamming=4)
        assert_that(out["records"] | "K" >> beam.Map(lambda r: r["key"]),
                    equal_to(["orig", "other"]))
        assert_that(
            out[DUPLICATES] | "D" >> beam.Map(lambda d: (d["key"], d["duplicate_of"],
                                                         d["method"], d["similarity"] >= 1 - 4 / 64)),
            equal_to([("crop", "orig", "phash_crop", True)]), label="dups")


def test_crop_matching_can_be_turned_off(scene_and_crop):
    with TestPipeline() as p:
        out = p | beam.Create(scene_and_crop) | DedupByContent(max_hamming=4, crops=False)
        assert_that(out["records"] | beam.Map(lambda r: r["key"]),
                    equal_to(["orig", "crop", "other"]))


def test_crop_hashes_match_full_hashes_not_each_other():
    a = node_of(rec("a", "1", 0b0000))._replace(crops=(0xFF,))
    b = node_of(rec("b", "2", 0xFFFF_0000))._replace(crops=(0xFF,))
    # a and b share a crop hash only: crop vs crop is not compared
    assert list(bucket_edges(("band", (0, 0xFF)), [(a, False), (b, False)], 4)) == []
    assert list(bucket_edges(("band", (0, 0xFF)), [(a, True), (b, False)], 4)) == []
    c = node_of(rec("c", "3", 0xFF))  # c's full hash is a's crop hash
    assert list(bucket_edges(("band", (0, 0xFF)), [(a, False), (c, True)], 4)) == [(a, c)]


def test_dedup_disabled_passes_everything():
    rows = [rec("a", "s", 1), rec("b", "s", 1)]
    with TestPipeline() as p:
        out = p | beam.Create(rows) | DedupByContent(enabled=False)
        assert_that(out["records"] | beam.Map(lambda r: r["key"]), equal_to(["a", "b"]))
