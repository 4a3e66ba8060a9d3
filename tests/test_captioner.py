"""HF captioner handler, the Caption and RotationPick stages, and the tiny BLIP-2 builder."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.demo.scenes import CLASSES, names_scene, render_scene
from pipelines.demo.tiny_blip2 import (
    MARKER,
    build_tiny_blip2,
    held_out_scenes,
    scene_naming_rate,
)
from pipelines.demo.tiny_models import build_tiny_clip
from pipelines.models.captioner import HFCaptioner
from pipelines.records import REJECTS
from pipelines.stages.caption_pick import (
    RotationPick,
    rotation_invariant_pick,
    rotations,
)
from pipelines.stages.captions import Caption, caption_decision, normalise_candidates

#: enough training for the tiny model to name most scenes (~15 s on 2 cores), not more
TEST_STEPS = 250


@pytest.fixture(scope="session")
def tiny_blip2(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("models") / "tiny-blip2")
    facts = build_tiny_blip2(out, seed=0, steps=TEST_STEPS)
    assert facts["complete"] and facts["steps_done"] == TEST_STEPS
    return out


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return build_tiny_clip(str(tmp_path_factory.mktemp("clip") / "tiny-clip"), seed=3)


def _records(n: int, seed: int = 5) -> list[dict]:
    out = []
    for i, (_, data) in enumerate(held_out_scenes(n, seed)):
        out.append({"key": f"k{i:03d}", "subset": "rs3", "source": "demo",
                    "source_id": str(i), "url": f"demo/{i}", "caption": None, "_image": data})
    return out


# ---------------------------------------------------------------------------- the builder


def test_build_is_cached_and_loadable_through_the_real_path(tiny_blip2):
    marker = json.loads(Path(tiny_blip2, MARKER).read_text())
    assert marker["seed"] == 0 and marker["steps"] == TEST_STEPS and marker["complete"]
    again = build_tiny_blip2(tiny_blip2, seed=0, steps=TEST_STEPS)
    assert again["cached"] is True
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json"):
        assert os.path.isfile(os.path.join(tiny_blip2, name)), name
    cfg = json.loads(Path(tiny_blip2, "config.json").read_text())
    assert cfg["model_type"] == "blip-2" and cfg["text_config"]["model_type"] == "opt"
    assert cfg["image_token_index"] is not None


def test_same_seed_same_weights(tmp_path, monkeypatch):
    import pipelines.demo.tiny_blip2 as tb

    monkeypatch.setattr(tb, "TRAIN_PER_CLASS", 2)  # fewer renders: the point is the weights
    a = build_tiny_blip2(str(tmp_path / "a"), seed=4, steps=3)
    b = build_tiny_blip2(str(tmp_path / "b"), seed=4, steps=3)
    c = build_tiny_blip2(str(tmp_path / "c"), seed=5, steps=3)
    assert not a["cached"] and not b["cached"] and not c["cached"]
    wa, wb, wc = ((tmp_path / d / "model.safetensors").read_bytes() for d in "abc")
    assert wa == wb
    assert wa != wc


def test_time_cap_is_opt_in_and_marks_a_cut_build_incomplete(tmp_path, monkeypatch):
    import pipelines.demo.tiny_blip2 as tb

    monkeypatch.setattr(tb, "TRAIN_PER_CLASS", 2)
    cut = build_tiny_blip2(str(tmp_path / "cut"), seed=4, steps=3, max_seconds=0)
    assert not cut["complete"] and cut["steps_done"] == 0
    # an incomplete build is not a cache hit: the next call (no cap) trains it in full
    again = build_tiny_blip2(str(tmp_path / "cut"), seed=4, steps=3)
    assert not again["cached"] and again["complete"] and again["steps_done"] == 3


def test_trained_tiny_model_names_the_scene(tiny_blip2):
    rate = scene_naming_rate(tiny_blip2, n=26, seed=1)
    assert rate >= 0.35, rate  # chance is 1/13 ≈ 0.08


def test_names_scene():
    assert names_scene("an aerial image of a Parking  Lot", "parking_lot")
    assert names_scene("a satellite image of a marina", "harbor")
    assert not names_scene("an aerial image of a forest", "river")
    assert not names_scene("lakeside houses", "lake")  # whole words only


# ---------------------------------------------------------------------------- the handler


def test_handler_gives_k_captions_deterministically_whatever_the_batch(tiny_blip2):
    recs = _records(5)
    h = HFCaptioner(tiny_blip2, device="cpu", batch_size=4, candidates=3, max_new_tokens=12)
    model = h.load_model()
    together = h.caption(recs[:4], model) + h.caption(recs[4:], model)
    alone = [h.caption([r], model)[0] for r in recs]
    again = h.caption(recs[:4], model)
    assert together == alone
    assert again == together[:4]
    for caps in together:
        assert len(caps) == 3 and all(isinstance(c, str) for c in caps)
        assert caps[0]  # the top beam says something
        assert len(set(caps)) == 3  # beams are distinct sequences


def test_sampling_is_per_record_and_seeded(tiny_blip2):
    recs = _records(3)
    kw = {"device": "cpu", "batch_size": 4, "candidates": 4, "do_sample": True, "top_p": 0.95,
          "temperature": 1.5, "max_new_tokens": 12}
    h = HFCaptioner(tiny_blip2, seed=1, **kw)
    model = h.load_model()
    batch = h.caption(recs, model)
    alone = [h.caption([r], model)[0] for r in recs]
    assert batch == alone
    other = HFCaptioner(tiny_blip2, seed=2, **kw)
    assert other.caption(recs, model) != batch


def test_prompt_is_not_repeated_in_the_candidates(tiny_blip2):
    h = HFCaptioner(tiny_blip2, device="cpu", candidates=2, prompt="an aerial image of",
                    max_new_tokens=6)
    model = h.load_model()
    caps = h.caption(_records(2), model)
    for c in caps:
        assert all(not x.startswith("an aerial image of") for x in c), c
        assert all(len(x.split()) <= 6 for x in c), c


def test_undecodable_image_gives_none_not_a_crash(tiny_blip2):
    recs = _records(2)
    recs.insert(1, {**recs[0], "key": "bad", "_image": b"not an image"})
    h = HFCaptioner(tiny_blip2, device="cpu", candidates=2, max_new_tokens=8)
    out = h.caption(recs, h.load_model())
    assert out[1] is None and out[0] and out[2]


def test_precision_on_cpu_is_fp32_and_says_so(tiny_blip2, caplog):
    with caplog.at_level(logging.INFO, logger="pipelines.models.captioner"):
        model = HFCaptioner(tiny_blip2, precision="fp16", device="cpu").load_model()
    assert model.dtype == torch.float32
    assert next(model.model.parameters()).dtype == torch.float32
    assert any("fp16" in r.getMessage() and "fp32" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="precision"):
        HFCaptioner(tiny_blip2, precision="int8")


def test_refuses_what_is_not_a_local_directory(tmp_path):
    for bad in ("Salesforce/blip2-opt-2.7b", "hf-hub:Salesforce/blip2-opt-2.7b",
                str(tmp_path / "missing")):
        with pytest.raises(ValueError, match="not a directory"):
            HFCaptioner(bad).load_model()
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(ValueError, match="not a supported captioner"):
        HFCaptioner(str(tmp_path / "clip")).load_model()


def test_argument_checks():
    with pytest.raises(ValueError, match="num_beams"):
        HFCaptioner("x", candidates=5, num_beams=3)
    with pytest.raises(ValueError, match="greedy"):
        HFCaptioner("x", candidates=2, num_beams=1)
    assert HFCaptioner("x", candidates=5, do_sample=True).generate_kwargs()["num_beams"] == 1
    kw = HFCaptioner("x", candidates=5, min_new_tokens=4).generate_kwargs()
    assert kw["num_beams"] == 5 and kw["num_return_sequences"] == 5
    assert kw["min_new_tokens"] == 4 and kw["max_new_tokens"] == 30


def test_blip_family_loads_and_captions(tmp_path):
    """A tiny random BLIP (``model_type: blip``) goes through the same handler."""
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    from pipelines.demo.tiny_blip2 import make_tokenizer

    tok = make_tokenizer(["an aerial image of a lake", "a forest with trees"])
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=32, patch_size=8)
    text = BlipTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=2, encoder_hidden_size=32,
                          max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                          sep_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BlipForConditionalGeneration(BlipConfig(vision_config=vision.to_dict(),
                                                        text_config=text.to_dict()))
    d = str(tmp_path / "tiny-blip")
    model.save_pretrained(d)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(d)
    h = HFCaptioner(d, device="cpu", candidates=2, max_new_tokens=5)
    loaded = h.load_model()
    assert loaded.family == "blip"
    out = h.caption(_records(2), loaded)
    assert all(len(c) == 2 and all(len(x.split()) <= 5 for x in c) for c in out)


def test_blip2_with_an_encoder_decoder_language_model(tmp_path):
    """BLIP-2 with a (tiny random) T5 language model, as blip2-flan-t5-*: no prompt echo."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        T5Config,
    )

    from pipelines.demo.tiny_blip2 import IMAGE_ID, make_tokenizer, tiny_config

    tok = make_tokenizer(["an aerial image of a lake", "a forest with trees"])
    base = tiny_config(len(tok)).to_dict()
    t5 = T5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=1,
                  num_decoder_layers=1, num_heads=2, pad_token_id=0, eos_token_id=2,
                  decoder_start_token_id=0, dropout_rate=0.0)
    cfg = Blip2Config(vision_config=base["vision_config"], qformer_config=base["qformer_config"],
                      text_config=t5.to_dict(), num_query_tokens=8, image_token_index=IMAGE_ID)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Blip2ForConditionalGeneration(cfg)
    d = str(tmp_path / "tiny-blip2-t5")
    model.save_pretrained(d)
    Blip2Processor(image_processor=BlipImageProcessor(size={"height": 64, "width": 64}),
                   tokenizer=tok, num_query_tokens=8).save_pretrained(d)
    h = HFCaptioner(d, device="cpu", candidates=2, max_new_tokens=5, prompt="an aerial image of")
    loaded = h.load_model()
    assert loaded.family == "blip-2" and loaded.prefix_len == 0
    out = h.caption(_records(2), loaded)
    assert all(len(c) == 2 and all(len(x.split()) <= 5 for x in c) for c in out)


# ---------------------------------------------------------------------------- Caption stage


def test_normalise_candidates_and_decision():
    assert normalise_candidates([" a  lake ", "", "a lake", "a\tforest", None, "a lake "]) == [
        "a lake", "a forest"]
    assert caption_decision({"key": "k"}, None).reason == "caption_failed"
    assert caption_decision({"key": "k"}, ["", "  "]).reason == "empty_caption"
    assert caption_decision({"key": "k"}, ["x  y", "x y"])["generated"] == ["x y"]


def test_caption_stage_in_a_pipeline(tiny_blip2):
    recs = _records(3)
    twin = {**recs[0], "key": "twin", "source_id": "twin"}  # same image, other key
    bad = {**recs[1], "key": "bad", "source_id": "bad", "_image": b"\xff\xd8 broken"}
    direct = HFCaptioner(tiny_blip2, device="cpu", batch_size=4, candidates=3,
                         max_new_tokens=12)
    expected = {r["key"]: normalise_candidates(c)
                for r, c in zip(recs, direct.caption(recs, direct.load_model()), strict=True)}
    expected["twin"] = expected[recs[0]["key"]]
    with TestPipeline() as p:
        out = (p | beam.Create(recs + [twin, bad])
               | Caption(tiny_blip2, device="cpu", batch_size=4, candidates=3,
                         max_new_tokens=12))
        assert_that(out.records | "kv" >> beam.Map(lambda r: (r["key"], r["generated"])),
                    equal_to(list(expected.items())), label="generated")
        assert_that(out[REJECTS] | beam.Map(lambda r: (r["key"], r["stage"], r["reason"])),
                    equal_to([("bad", "caption", "caption_failed")]), label="rejects")
    assert all(1 <= len(v) <= 3 for v in expected.values())


# ---------------------------------------------------------------------------- RotationPick


def test_rotation_invariant_pick_prefers_captions_true_at_every_rotation():
    eye = np.eye(4)
    images = eye  # the four rotations embed to four orthogonal directions
    upright_only = eye[0]  # cos 1 at 0°, 0 at 90/180/270 → mean 0.25
    everywhere = eye.sum(0) / 2  # cos 0.5 at every rotation → mean 0.5
    scores, pick = rotation_invariant_pick(images, np.stack([upright_only, everywhere]))
    assert pick == 1
    assert scores == pytest.approx([0.25, 0.5], abs=1e-6)
    # at 0° alone the upright caption would win: the rotations are what decide
    assert float(images[0] @ upright_only) > float(images[0] @ everywhere)
    # ties go to the earlier candidate
    _, pick = rotation_invariant_pick(images, np.stack([upright_only, everywhere, everywhere]))
    assert pick == 1
    _, pick = rotation_invariant_pick(images, np.stack([everywhere * 3, everywhere]))
    assert pick == 0  # norms do not matter: cosines
    with pytest.raises(ValueError):
        rotation_invariant_pick(images, np.zeros((0, 4)))


def test_rotation_pick_stage_sets_aligned_scores(tiny_clip):
    from pipelines.models.open_clip_loader import decode_image, encode_images, load_open_clip

    recs = []
    rng = np.random.default_rng(0)
    for i in range(3):
        img, _ = render_scene(CLASSES[i], rng, 96)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        recs.append({"key": f"r{i}", "subset": "rs3", "source": "demo", "source_id": str(i),
                     "url": None, "caption": None, "_image": buf.getvalue(),
                     "generated": ["an aerial image of a forest", "a lake", f"{CLASSES[i]}"][
                         : 2 + i % 2]})
    bad = {**recs[0], "key": "bad", "_image": b"nope"}
    empty = {**recs[0], "key": "empty", "generated": []}

    net, preprocess, tokenizer = load_open_clip(tiny_clip)
    expected = {}
    for r in recs:
        imgs = encode_images(net, preprocess, rotations(decode_image(r["_image"])))
        with torch.inference_mode():
            txt = net.encode_text(tokenizer(r["generated"])).float().numpy()
        expected[r["key"]] = rotation_invariant_pick(imgs, txt)

    with TestPipeline() as p:
        out = p | beam.Create(recs + [bad, empty]) | RotationPick(tiny_clip, batch_size=8)
        got = out.records | beam.Map(lambda r: (r["key"], r["generated_scores"],
                                                r["generated_pick"], len(r["generated"])))

        def check(rows):
            assert sorted(k for k, *_ in rows) == ["r0", "r1", "r2"]
            for key, scores, pick, k in rows:
                want_scores, want_pick = expected[key]
                assert len(scores) == k
                assert scores == pytest.approx(want_scores, abs=1e-4)
                assert pick == want_pick == int(np.argmax(scores))

        assert_that(got, check, label="scores")
        assert_that(out[REJECTS] | beam.Map(lambda r: (r["key"], r["stage"], r["reason"])),
                    equal_to([("bad", "caption_pick", "caption_pick_failed"),
                              ("empty", "caption_pick", "caption_pick_failed")]),
                    label="rejects")


def test_the_captioner_can_be_shared_by_a_machine_s_processes(tiny_blip2):
    assert not HFCaptioner(tiny_blip2).share_model_across_processes()
    assert HFCaptioner(tiny_blip2, share_across_processes=True).share_model_across_processes()
