"""The demo world: deterministic, its planted cases really are what the ground truth says."""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import socket
import struct
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from pipelines.demo import pub11, scenes
from pipelines.demo.pub11 import PLANTED_KINDS, build_pub11

SMALL = {"n_rs": 12, "n_non_rs": 9, "n_probe": 4}
SMALL_LOCAL = 6
SMALL_RS3 = 4
SMALL_RC = 4
EXTRA = {"n_local": SMALL_LOCAL, "n_rs3": SMALL_RS3, "n_remoteclip": SMALL_RC,
         "n_skyscript": 1}
WORLD_PARAMS = {**SMALL, **EXTRA}  # what world.json records


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """The same small world built twice (same seed and base URL), into two folders."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    a = str(tmp_path_factory.mktemp("world_a"))
    b = str(tmp_path_factory.mktemp("world_b"))
    from pipelines.demo.local import build_local

    summary = build_pub11(a, base, seed=3, **SMALL, extra_params=EXTRA)
    build_local(a, seed=3, n=SMALL_LOCAL)
    build_pub11(b, base, seed=3, **SMALL, extra_params=EXTRA)
    build_local(b, seed=3, n=SMALL_LOCAL)
    return a, b, port, summary


@pytest.fixture(scope="module")
def world(worlds):
    return worlds[0]


@pytest.fixture(scope="module")
def gt(world):
    return pq.read_table(os.path.join(world, "ground_truth.parquet")).to_pylist()


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _img_path(world: str, name: str) -> str:
    return os.path.join(world, "www", "img", name)


def _rows(gt, planted):
    rows = [r for r in gt if r["planted"] == planted]
    assert rows, planted
    return rows


def _phash(img: Image.Image) -> int:
    import imagehash

    return int(str(imagehash.phash(img)), 16)


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes(worlds):
    a, b, _, _ = worlds
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    assert len(fa) > 50
    different = [k for k in fa if fa[k] != fb[k]]
    assert not different, different[:10]


def test_layout_and_world_json(worlds):
    a, _, port, summary = worlds
    for s in pub11.SOURCES:
        assert os.path.isfile(os.path.join(a, "pub11", s, "part-00000.parquet"))
    assert len(os.listdir(os.path.join(a, "probe", "rs"))) == SMALL["n_probe"]
    assert len(os.listdir(os.path.join(a, "probe", "non_rs"))) == SMALL["n_probe"]
    with open(os.path.join(a, "world.json")) as f:
        world = json.load(f)
    assert world["seed"] == 3
    assert world["base_url"] == f"http://127.0.0.1:{port}"
    assert world["version"] == pub11.GENERATOR_VERSION
    assert world["classes"] == list(scenes.CLASSES) and len(world["classes"]) >= 10
    assert world["params"] == WORLD_PARAMS
    assert world["counts"] == summary


def test_scenes_are_deterministic_and_varied():
    img1, meta1 = scenes.render_scene("farmland", np.random.default_rng(1))
    img2, meta2 = scenes.render_scene("farmland", np.random.default_rng(1))
    img3, _ = scenes.render_scene("farmland", np.random.default_rng(2))
    assert img1.tobytes() == img2.tobytes() and meta1 == meta2
    assert img1.tobytes() != img3.tobytes()
    assert img1.mode == "RGB" and img1.size == (256, 256)


# ----------------------------------------------------------------------------- parquet


def test_column_spellings_per_source(world):
    laion = pq.read_schema(os.path.join(world, "pub11", "laion2b-en", "part-00000.parquet"))
    assert laion.names[:8] == ["SAMPLE_ID", "URL", "TEXT", "HEIGHT", "WIDTH", "LICENSE", "NSFW",
                               "similarity"]
    assert str(laion.field("SAMPLE_ID").type) == "int64"
    assert str(laion.field("similarity").type) == "double"
    coyo = pq.read_schema(os.path.join(world, "pub11", "coyo-700m", "part-00000.parquet"))
    for name in ("id", "url", "text", "width", "height", "clip_similarity_vitb32",
                 "image_phash"):
        assert name in coyo.names, name
    assert str(coyo.field("image_phash").type) == "string"
    cc = pq.read_schema(os.path.join(world, "pub11", "cc12m-web", "part-00000.parquet"))
    assert cc.names == ["url", "caption"]
    assert str(cc.field("caption").type) == "binary"


def test_ground_truth_matches_parquet_rows(world, gt):
    from pipelines.records import make_key

    id_col = {"laion2b-en": ("SAMPLE_ID", "URL"), "coyo-700m": ("id", "url"),
              "cc12m-web": (None, "url")}
    n = 0
    for s in pub11.SOURCES:
        rows = pq.read_table(os.path.join(world, "pub11", s, "part-00000.parquet")).to_pylist()
        mine = sorted((r for r in gt if r["source"] == s), key=lambda r: r["row"])
        assert [r["row"] for r in mine] == list(range(len(rows)))
        idc, urlc = id_col[s]
        for g, row in zip(mine, rows, strict=True):
            want_id = str(row[idc]) if idc else f"part-00000:{g['row']}"
            assert g["source_id"] == want_id
            assert g["url"] == row[urlc]
            assert g["key"] == make_key(s, g["source_id"])
        n += len(rows)
    assert n == len(gt)
    # ids are unique per source, but for the planted repeated ids (each repeats one row's)
    repeated = [r for r in gt if r["planted"] == "duplicate_id"]
    assert len({(r["source"], r["source_id"]) for r in gt}) == len(gt) - len(repeated)
    for r in repeated:
        first = [g for g in gt if (g["source"], g["source_id"]) == (r["source"], r["source_id"])
                 and g is not r]
        assert len(first) == 1 and first[0]["row"] < r["row"]
        assert first[0]["expected"] != "rejected" and first[0]["is_rs"]
    for r in gt:
        assert r["expected"] in ("kept", "rejected", "duplicate")
        assert r["expected_stage"] in (None, "read", "keywords", "fetch", "decode", "dedup",
                                       "rs_filter")
        assert (r["expected_stage"] is None) == (r["expected"] == "kept")
        assert r["is_rs"] == (r["scene_class"] is not None)


def test_every_planted_kind_is_present_with_its_expectation(gt):
    seen = {r["planted"] for r in gt if r["planted"]}
    assert seen == set(PLANTED_KINDS)
    for r in gt:
        kind = r["planted"]
        if kind and PLANTED_KINDS[kind][0] != "duplicate":
            assert (r["expected"], r["expected_stage"], r["expected_reason"]) == \
                PLANTED_KINDS[kind], r
    for kind in PLANTED_KINDS:  # a few rows of each, across sources where a source can hold it
        rows = _rows(gt, kind)
        assert len(rows) >= 2, kind
        if kind not in ("caption_not_utf8", "duplicate_id"):  # one source can hold these
            assert len({r["source"] for r in rows}) >= 2, kind


def test_row_mix(gt):
    rs = [r for r in gt if r["is_rs"] and not r["planted"] and not r["duplicate_group"]]
    assert len(rs) == SMALL["n_rs"] - 10  # 10 clean rows are the originals of duplicate groups
    everyday = [r for r in gt if r["everyday_kind"] and not r["planted"]]
    assert everyday and all(r["expected_reason"] == "no_keyword" for r in everyday)
    assert all(not r["is_rs"] for r in _rows(gt, "rs_keyword_decoy"))


# ----------------------------------------------------------------------------- captions


def test_captions_against_the_rs5m_keyword_filter(gt):
    from pipelines.stages import keywords as kw
    f = kw.KeywordFilter.load()
    for r in gt:
        cap = r["caption"]
        if not cap or not cap.strip():
            continue
        out = f({"caption": cap})
        reason = getattr(out, "reason", None)
        if r["planted"] == "excluded_phrase":
            assert reason == "excluded_phrase", cap
        elif r["expected_reason"] == "no_keyword":
            assert reason == "no_keyword", cap
        else:  # every RS row, every decoy and every planted row reaches the image stages
            assert reason is None, (r["planted"], cap)


def test_non_utf8_captions_are_invalid_utf8(world, gt):
    table = pq.read_table(os.path.join(world, "pub11", "cc12m-web", "part-00000.parquet"))
    caps = table.column("caption").to_pylist()
    rows = _rows(gt, "caption_not_utf8")
    assert all(r["source"] == "cc12m-web" for r in rows)
    for r in rows:
        raw = caps[r["row"]]
        assert isinstance(raw, bytes) and raw
        with pytest.raises(UnicodeDecodeError):
            raw.decode("utf-8")
    for r in _rows(gt, "empty_caption"):
        assert r["caption"] == ""


@pytest.mark.parametrize("cls", scenes.CLASSES)
def test_scene_captions_name_the_class_and_state_true_counts(cls):
    words = {"car": "car", "airplane": "(?:airplane|plane)", "boat": "boat",
             "building": "(?:house|warehouse|farm building)", "storage_tank": "storage tank",
             "umbrella": "beach umbrella"}
    for seed in range(4):
        rng = np.random.default_rng([11, seed])
        img, meta = scenes.render_scene(cls, rng, 192)
        assert img.size == (192, 192) and meta["class"] == cls
        for i in range(3):
            cap = scenes.caption_scene(cls, meta, np.random.default_rng([12, seed, i]))
            low = cap.lower()
            assert any(n in low for n in scenes.CLASS_NAMES[cls]), cap
            for obj, word in words.items():
                for m in re.finditer(r"\b(\w+) " + word + r"s?\b", low):
                    num = m.group(1)
                    n = scenes._NUMBER_WORDS.index(num) if num in scenes._NUMBER_WORDS else (
                        int(num) if num.isdigit() else None)
                    if n is not None:
                        assert meta["objects"].get(obj, 0) == n, (cap, meta["objects"])


def test_everyday_captions_have_no_rs_terms_and_look_like_photos():
    from pipelines.stages import keywords as kw
    f = kw.KeywordFilter.load()
    ratios = {"aerial": [], "everyday": []}
    for i in range(27):
        img, cap, kind = scenes.render_everyday(np.random.default_rng([5, i]), 128)
        assert kind in scenes.EVERYDAY_KINDS
        assert f.match(cap) is None, cap
        a = np.asarray(img, dtype=np.float32).mean(2)
        ratios["everyday"].append(a.mean(1).std() / (a.mean(0).std() + 1e-6))
        cls = scenes.CLASSES[i % len(scenes.CLASSES)]
        a = np.asarray(scenes.render_scene(cls, np.random.default_rng([5, i]), 128)[0],
                       dtype=np.float32).mean(2)
        ratios["aerial"].append(a.mean(1).std() / (a.mean(0).std() + 1e-6))
    # horizon + sky gradient: structure runs top-to-bottom in photos, in no direction in scenes
    assert np.mean(ratios["everyday"]) > 2 * np.mean(ratios["aerial"])


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize("cls,label", [("parking_lot", "car"), ("airport", "airplane"),
                                       ("harbor", "boat"), ("industrial", "storage_tank"),
                                       ("highway", "car"), ("residential", "building")])
def test_object_counts_match_the_drawn_boxes(cls, label):
    for seed in range(3):
        img, meta = scenes.render_scene(cls, np.random.default_rng([21, seed]), 256)
        boxes = [b for b in meta["boxes"] if b[0] == label]
        assert meta["objects"].get(label, 0) == len(boxes)
        a = np.asarray(img, dtype=np.float32)
        bg = np.median(a.reshape(-1, 3), axis=0)
        for (_, x0, y0, x1, y1), (_, u0, v0, u1, v1) in itertools.combinations(boxes, 2):
            if label != "building":  # cars, planes, boats and tanks never overlap
                assert x1 <= u0 or u1 <= x0 or y1 <= v0 or v1 <= y0, (cls, seed)
        for _, x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
            patch = a[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))]
            # something unlike the background is drawn inside every counted box
            assert np.abs(patch - bg).max(axis=2).mean() > 15, (cls, seed, (x0, y0, x1, y1))


def test_parking_lot_count_in_ground_truth(gt):
    for r in gt:
        if r["objects"] and r["boxes"]:
            objects, boxes = json.loads(r["objects"]), json.loads(r["boxes"])
            for label in ("car", "airplane", "boat", "storage_tank"):
                assert objects.get(label, 0) == sum(1 for b in boxes if b[0] == label)


# ----------------------------------------------------------------------------- planted files


def test_decompression_bomb_header_claims_huge_dims(world, gt):
    for r in _rows(gt, "decompression_bomb"):
        path = _img_path(world, r["image"])
        data = _read(path)
        assert len(data) < 1024
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        w, h = struct.unpack(">II", data[16:24])
        assert w * h >= 20000 * 20000 and (w, h) == (r["width"], r["height"])
        with pytest.raises(Image.DecompressionBombError):
            Image.open(path)


def test_hard_but_valid_encodings(world, gt):
    def open_(r):
        return Image.open(_img_path(world, r["image"]))

    for r in _rows(gt, "palette_png"):
        assert open_(r).mode == "P"
    for r in _rows(gt, "cmyk_jpeg"):
        im = open_(r)
        assert im.mode == "CMYK" and im.format == "JPEG"
    for r in _rows(gt, "gray16_png"):
        im = open_(r)
        assert im.mode.startswith("I;16")
        assert int(np.asarray(im).max()) > 255  # really 16-bit, not 8-bit in a 16-bit box
    for r in _rows(gt, "rgba_png"):
        im = open_(r)
        assert im.mode == "RGBA" and np.asarray(im)[..., 3].min() == 0
    for r in _rows(gt, "webp"):
        assert open_(r).format == "WEBP"
    for r in _rows(gt, "exif_rotated"):
        im = open_(r)
        assert im.getexif().get(0x0112) == 6
        want = int(r["phash"], 16)
        upright = ImageOps.exif_transpose(im)
        assert (_phash(upright) ^ want).bit_count() <= 4  # the picture the caption describes
        assert (_phash(im) ^ want).bit_count() > 10  # stored sideways


def test_broken_files(world, gt):
    for r in _rows(gt, "truncated_jpeg"):
        im = Image.open(_img_path(world, r["image"]))
        with pytest.raises(OSError):
            im.load()
    for r in _rows(gt, "tiny_image"):
        assert Image.open(_img_path(world, r["image"])).size == (16, 16)
    for r in _rows(gt, "too_large"):
        assert os.path.getsize(_img_path(world, r["image"])) > 2 * 2**20
    for r in _rows(gt, "empty_body"):
        if r["image"]:
            assert os.path.getsize(_img_path(world, r["image"])) == 0
        else:
            assert r["url"].split("?")[0].endswith("/empty")
    for r in _rows(gt, "html_as_image"):
        if r["image"]:
            assert _read(_img_path(world, r["image"])).startswith(b"<!DOCTYPE html")
        else:
            assert r["url"].split("?")[0].endswith("/html")
    for r in _rows(gt, "missing_url"):
        assert r["url"] is None


def test_urls_follow_the_server_contract(worlds, gt):
    world, _, port, _ = worlds
    base = f"http://127.0.0.1:{port}"
    routes = {
        "connection_refused": r"http://127\.0\.0\.1:9/img/.+",
        "http_500": re.escape(base) + r"/status/500\?.*",
        "slow_response": re.escape(base) + r"/slow/\d+/img/.+",
        "robots_noai": re.escape(base) + r"/noai/img/.+",
        "redirect": re.escape(base) + r"/redirect/img/.+",
        "flaky_503": re.escape(base) + r"/flaky/2/img/.+",
        "rate_limited_429": re.escape(base) + r"/ratelimit/img/.+",
    }
    for kind, pattern in routes.items():
        for r in _rows(gt, kind):
            assert re.fullmatch(pattern, r["url"]), (kind, r["url"])
    for r in gt:  # every file an /img/ route names exists, but for the planted 404
        if r["url"] and r["url"].startswith(base) and "/img/" in r["url"]:
            name = r["url"].split("/img/", 1)[1]
            exists = os.path.isfile(_img_path(world, name))
            gone = r["planted"] == "http_404" or "/flaky/1000000/" in r["url"]
            assert exists != gone, r["url"]
    # apart from the planted repeats, every URL is unique: URL dedup must not hide a case
    urls = [r["url"] for r in gt if r["url"] and r["planted"] != "repeated_url"]
    assert len(urls) == len(set(urls))


def test_duplicate_groups(world, gt):
    groups: dict[str, list[dict]] = {}
    for r in gt:
        if r["duplicate_group"]:
            groups.setdefault(r["duplicate_group"], []).append(r)
    assert len(groups) == 10
    for members in groups.values():
        assert len(members) == 2
        assert sorted(m["expected"] for m in members) == ["duplicate", "kept"]
        copy = next(m for m in members if m["planted"])
        orig = next(m for m in members if not m["planted"])
        dup = next(m for m in members if m["expected"] == "duplicate")
        assert dup["expected_reason"] == PLANTED_KINDS[copy["planted"]][2]
        a = _read(_img_path(world, orig["image"]))
        b = _read(_img_path(world, copy["image"]))
        if copy["planted"] == "repeated_url":
            assert copy["url"] == orig["url"]
            assert dup["key"] == max(m["key"] for m in members)  # smallest key survives
        elif copy["planted"] == "same_bytes":
            assert copy["url"] != orig["url"] and a == b
        elif copy["planted"] == "cropped_copy":
            # the full pHash misses the crop; the pipeline's crop-aware distance catches it
            from pipelines.stages.dedup import distance
            from pipelines.stages.images import hamming, normalise_image, split_hashes

            na, nb = normalise_image(a), normalise_image(b)
            assert hamming(na.phash, nb.phash) > 4
            assert distance(int(na.phash, 16), split_hashes(na.phash_crops), int(nb.phash, 16),
                            split_hashes(nb.phash_crops)) <= 4
            assert dup is copy and copy["width"] < orig["width"]
        else:
            assert a != b
            pa_, pb_ = _phash(Image.open(io.BytesIO(a))), _phash(Image.open(io.BytesIO(b)))
            assert (pa_ ^ pb_).bit_count() <= 4
            assert dup is copy  # the original has more pixels / more bytes
            if copy["planted"] == "resized_copy":
                assert copy["width"] == round(orig["width"] * 0.7)
            else:
                assert len(b) < len(a)


def test_distinct_pictures_are_far_apart_in_phash(gt):
    rows = [r for r in gt if r["phash"] and r["image"] and r["planted"] not in
            ("recompressed_copy", "resized_copy", "cropped_copy")]
    hashes = {}
    for r in rows:
        hashes.setdefault(r["image"], int(r["phash"], 16))
    for (na, a), (nb, b) in itertools.combinations(hashes.items(), 2):
        if na.split("-mirror")[0].split(".")[0] == nb.split("-mirror")[0].split(".")[0]:
            continue  # a same_bytes copy
        assert (a ^ b).bit_count() >= pub11.MIN_PHASH_DISTANCE - 2, (na, nb)


# ----------------------------------------------------------------------------- CLI


def test_cli_build_if_missing_keeps_a_current_world(worlds, monkeypatch):
    from pipelines.demo import __main__ as cli

    world, _, port, _ = worlds
    assert cli.world_is_current(world, 3, f"http://127.0.0.1:{port}", WORLD_PARAMS)
    assert not cli.world_is_current(world, 4, f"http://127.0.0.1:{port}", WORLD_PARAMS)
    from pipelines.demo import tiny_blip2, tiny_models

    models = []
    monkeypatch.setattr(tiny_models, "build_tiny_models", lambda *a, **k: models.append(a))
    blips = []
    monkeypatch.setattr(tiny_blip2, "build_tiny_blip2", lambda *a, **k: blips.append(a))
    calls = []
    monkeypatch.setattr(pub11, "build_pub11", lambda *a, **k: calls.append(a))
    before = os.path.getmtime(os.path.join(world, "world.json"))
    rc = cli.main(["build", "--out", world, "--port", str(port), "--seed", "3", "--if-missing",
                   "--n-rs", "12", "--n-non-rs", "9", "--n-probe", "4",
                   "--n-local", str(SMALL_LOCAL), "--n-rs3", str(SMALL_RS3),
                   "--n-remoteclip", str(SMALL_RC), "--n-skyscript", "1"])
    assert rc == 0 and calls == []
    assert models == [(os.path.join(world, "models"), 3)]  # no models yet: built
    # the captioner keeps itself when current (its own marker): always asked
    assert blips == [(os.path.join(world, "models", "tiny-blip2"),)]
    assert os.path.getmtime(os.path.join(world, "world.json")) == before


def test_cli_serve_runs_the_command_and_returns_its_exit_code(worlds):
    from pipelines.demo import __main__ as cli

    world, _, port, _ = worlds
    probe = ("import os, sys, urllib.request\n"
             "base = os.environ['RS_CORPUS_DEMO_BASE_URL']\n"
             "body = urllib.request.urlopen(base + '/img/rs-00000.jpg', timeout=5).read()\n"
             "sys.exit(7 if body[:2] == b'\\xff\\xd8' else 1)\n")
    rc = cli.main(["serve", "--out", world, "--port", str(port), "--",
                   sys.executable, "-c", probe])
    assert rc == 7


def test_cli_serve_port_in_use(worlds, caplog):
    from pipelines.demo import __main__ as cli

    world, _, port, _ = worlds
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the port may be in TIME_WAIT
        s.bind(("127.0.0.1", port))
        s.listen(1)
        assert cli.main(["serve", "--out", world, "--port", str(port), "--", "true"]) == 2
    assert "already in use" in caplog.text


def test_cli_knows_the_names_tiny_models_writes():
    from pipelines.demo import __main__ as cli
    from pipelines.demo import tiny_models

    assert (cli.TINY_CLIP_DIR, cli.RS_PROBE_FILE) == (
        tiny_models.TINY_CLIP_DIR, tiny_models.RS_PROBE_FILE)


# ----------------------------------------------------------------------------- the folder


def test_the_captioned_folder_plants_every_case(world):
    from pipelines.demo.local import PLANTED_KINDS as LOCAL_KINDS
    from pipelines.sources.folder import find_table

    truth = pq.read_table(os.path.join(world, "local_truth.parquet")).to_pylist()
    lines = _read(os.path.join(world, "local", "metadata.jsonl")).splitlines()
    assert len(truth) == len(lines) and [r["row"] for r in truth] == list(range(len(lines)))
    assert {r["planted"] for r in truth if r["planted"]} == set(LOCAL_KINDS)
    assert find_table(os.path.join(world, "local")).endswith("metadata.jsonl")
    link = os.path.join(world, "local", "images", "planted", "link-out.jpg")
    assert os.path.islink(link) and not os.path.realpath(link).startswith(
        os.path.realpath(os.path.join(world, "local")))
    shared = next(r for r in truth if r["planted"] == "shared_with_pub11")
    gt = pq.read_table(os.path.join(world, "ground_truth.parquet")).to_pylist()
    web = next(g for g in gt if g["key"] == shared["shared_key"])
    assert _read(os.path.join(world, "local", shared["image"])) == _read(
        _img_path(world, web["image"]))  # the same bytes: a sha256 duplicate when built together
    clean = [r for r in truth if not r["planted"]]
    assert len(clean) == SMALL_LOCAL and all(r["expected"] == "kept" for r in clean)
