"""Trainer unit tests: data stream, augmentation, optimiser groups, PEFT, checkpoints.

Fixtures are built here: a few webdataset shards written with ``webdataset.TarWriter`` (two
subsets, one corrupt JPEG, one caption longer than the text context) and the tiny CLIP from
``build_tiny_clip``. Nothing reads ``out/rs5m``.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200),
           "yellow": (220, 210, 40)}
LONG_CAPTION = " ".join(["a very long remote sensing caption about fields and roads"] * 12)


def _jpeg(colour: tuple[int, int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour)[None, None, :] + rng.integers(-30, 30, (48, 48, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), "RGB").save(buf, "JPEG", quality=85)
    return buf.getvalue()


def write_shards(root: Path, layout: dict[str, list[int]], corrupt: bool = True,
                 long_caption: bool = True, counted: bool = False) -> Path:
    """A build folder as the sink writes one: ``root/shards/{subset}-{i:05d}.tar`` with
    ``layout[subset][i]`` samples each (three captions per sample in ``{key}.json``), sizes.json
    and a stats.json (its presence says the build completed). ``counted``: every other primary
    caption states a count ("a satellite image of 3 red fields")."""
    import webdataset as wds

    import schemas

    shards = root / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    sizes = {}
    n = 0
    for subset, counts in layout.items():
        for i, count in enumerate(counts):
            name = f"{subset}-{i:05d}.tar"
            with wds.TarWriter(str(shards / name)) as tw:
                for j in range(count):
                    cname = list(COLOURS)[n % len(COLOURS)]
                    key = f"{subset}{i:03d}{j:04d}aa{n:06d}"
                    img = _jpeg(COLOURS[cname], n)
                    text = f"a satellite image of a {cname} field"
                    if counted and n % 2 == 0:
                        k = 1 + (n // 2) % 10
                        text = f"a satellite image of {k} {cname} field{'s' if k > 1 else ''}"
                    if corrupt and i == 0 and j == 1 and subset == next(iter(layout)):
                        img = b"\xff\xd8\xff not a jpeg"
                    if long_caption and i == 0 and j == 2 and subset == next(iter(layout)):
                        text = LONG_CAPTION
                    captions = [text, f"an aerial photo of a {cname} field",
                                f"a {cname} field seen from above"]
                    tw.write({"__key__": key, "jpg": img, "txt": text,
                              "json": {"key": key, "subset": subset, "captions": captions}})
                    n += 1
            sizes[name] = count
    (shards / "sizes.json").write_text(json.dumps(sizes))
    (root / "stats.json").write_text(json.dumps({"schema_version": schemas.SCHEMA_VERSION,
                                                 "kept": sum(sizes.values())}))
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from pipelines.demo.tiny_models import build_tiny_clip

    return build_tiny_clip(str(tmp_path_factory.mktemp("models") / "tiny-clip"), seed=0)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("corpus"), {"pub11": [24, 24], "rs3": [16]})


def _tokenizer():
    import open_clip

    return open_clip.get_tokenizer("RS-Tiny-ViT")


def _stream(corpus, rank=0, world=1, batch=4, seed=0, start=None, mix=None, log_keys=True,
            caption_choice="first", counterfactuals=0, count_sigma=0.0):
    from pipelines.models.open_clip_loader import register_configs
    from trainer.augment import RSAugment
    from trainer.data import ShardBatches, StreamConfig, expand_urls

    register_configs()
    cfg = StreamConfig(urls=expand_urls(str(corpus)), batch_size=batch, seed=seed, rank=rank,
                       world_size=world, mix=mix, shuffle_buffer=16,
                       start_positions=start or {}, log_keys=log_keys,
                       caption_choice=caption_choice, counterfactuals=counterfactuals,
                       count_sigma=count_sigma)
    aug = RSAugment(32, [0.5] * 3, [0.25] * 3)
    return iter(ShardBatches(cfg, aug, _tokenizer()))


# ------------------------------------------------------------------------------ data


def test_expand_urls_subsets_and_mix(corpus):
    from trainer.data import dataset_size, expand_urls, parse_mix, plan_shards, subset_of

    urls = expand_urls(str(corpus))
    assert [os.path.basename(u) for u in urls] == ["pub11-00000.tar", "pub11-00001.tar",
                                                   "rs3-00000.tar"]
    assert expand_urls(str(corpus / "shards" / "pub11-{00000..00001}.tar")) == urls[:2]
    assert expand_urls(f"{urls[0]}::{urls[2]}") == [urls[0], urls[2]]
    assert [subset_of(u) for u in urls] == ["pub11", "pub11", "rs3"]
    assert subset_of("pipe:curl -s https://x/y/rs3-00012.tar") == "rs3"
    assert dataset_size(urls) == 64
    assert parse_mix("pub11=0.6,rs3=0.4") == {"pub11": 0.6, "rs3": 0.4}
    # 2 pub11 shards over 2 global workers: split shard-wise; 1 rs3 shard: split sample-wise
    p0 = plan_shards(urls, {"pub11": 1, "rs3": 1}, 0, 2)
    p1 = plan_shards(urls, {"pub11": 1, "rs3": 1}, 1, 2)
    assert p0.shards["pub11"] == [urls[0]] and p1.shards["pub11"] == [urls[1]]
    assert p0.modulo["rs3"] == (0, 2) and p1.modulo["rs3"] == (1, 2)
    with pytest.raises(ValueError):
        plan_shards(urls, {"nope": 1.0}, 0, 1)


def test_a_build_folder_must_have_completed(corpus, tmp_path):
    """A killed or failed build leaves no stats.json (the sink writes it last, and a rebuild
    removes it first): its shards may not match its sizes, so the trainer refuses it."""
    import shutil

    import schemas
    from trainer.data import expand_urls

    killed = tmp_path / "killed"
    shutil.copytree(corpus, killed)
    (killed / "stats.json").unlink()
    with pytest.raises(FileNotFoundError, match="no stats.json: its build did not complete"):
        expand_urls(str(killed))
    old = tmp_path / "old"
    shutil.copytree(corpus, old)
    (old / "stats.json").write_text(json.dumps({"schema_version": "0.9"}))
    with pytest.raises(ValueError, match="schema version"):
        expand_urls(str(old))
    assert schemas.SCHEMA_VERSION.split(".")[0] != "0"


@pytest.mark.parametrize("spec", ["nowhere/out/rs5m", "nowhere/shards/x-{00000..00002}.tar",
                                  "nowhere/*.tar"])
def test_data_that_names_nothing_says_what_to_run(spec, tmp_path, monkeypatch):
    from trainer.data import expand_urls

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="make build-rs5m"):
        expand_urls(spec)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no shards in empty"):
        expand_urls("empty")


def test_make_train_checks_the_data_in_one_line(corpus, capsys):
    """What make train runs before torchrun: one line, not a traceback per rank."""
    from trainer.data import main

    assert main(["nowhere/out/rs5m"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "make build-rs5m" in out[0]
    assert main([str(corpus)]) == 0
    out = capsys.readouterr().out
    assert "3 shards" in out and "64 samples" in out


def test_random_caption_choice_uses_every_caption_and_resumes_exactly(corpus):
    """Any three visits of a sample train on its three captions; a resumed stream picks the
    same caption at every position as the uninterrupted one."""
    from trainer.data import choose_caption, expand_urls, plan_shards, raw_stream

    urls = expand_urls(str(corpus))
    plan = plan_shards(urls, None, 0, 1)
    seen: dict[str, list[str]] = {}
    for _, sample in zip(range(64 * 6), raw_stream(plan, seed=7, g=0), strict=False):
        seen.setdefault(sample["__key__"], []).append(choose_caption(sample, "random", seed=7))
        assert choose_caption(sample, "first") == sample["txt"].decode()
    captions = {s["__key__"]: json.loads(s["json"])["captions"]
                for _, s in zip(range(64 * 6), raw_stream(plan, 7, 0), strict=False)}
    visited = {k: v for k, v in seen.items() if len(v) >= 3}
    assert len(visited) > 20
    for k, chosen in visited.items():
        for i in range(len(chosen) - 2):  # any three visits in a row use all three captions
            assert sorted(chosen[i:i + 3]) == sorted(captions[k]), (k, chosen)
    # another seed starts samples on other captions
    firsts = list(zip(range(64), raw_stream(plan, 7, 0), strict=False))
    assert [choose_caption(s, "random", seed=8) for _, s in firsts] != \
        [choose_caption(s, "random", seed=7) for _, s in firsts]
    # tokens of a resumed stream (fast-forwarded) equal the uninterrupted stream's
    a = _stream(corpus, seed=3, caption_choice="random")
    first = [next(a) for _ in range(8)]
    b = _stream(corpus, seed=3, caption_choice="random", start={0: first[4]["next_position"]})
    rest = [next(b) for _ in range(3)]
    assert all(torch.equal(x["text"], y["text"]) for x, y in zip(rest, first[5:], strict=True))
    plain = _stream(corpus, seed=3)
    assert any(not torch.equal(x["text"], next(plain)["text"]) for x in first)


def test_counterfactual_twins_batched_with_their_captions(tmp_path):
    """With counterfactuals on, each caption stating a count has K twins that differ in the
    count (and its noun's number) only, each count another; others are masked out; the twins
    are deterministic."""
    import re

    counted = write_shards(tmp_path / "counted", {"pub11": [24]}, corrupt=False,
                           long_caption=False, counted=True)
    tok = _tokenizer()
    batches = [b for _, b in zip(range(4), _stream(counted, batch=6, counterfactuals=3),
                                 strict=False)]
    again = [b for _, b in zip(range(4), _stream(counted, batch=6, counterfactuals=3),
                               strict=False)]

    def words(tokens):  # the BPE splits digits: "1 0" is 10
        c = tok.decode(tokens.tolist()).replace("<start_of_text>", "").split("<end_of")[0]
        return re.sub(r"(\d) (?=\d)", r"\1", c)

    n_twins = 0
    for b, b2 in zip(batches, again, strict=True):
        assert torch.equal(b["cf_text"], b2["cf_text"]) and torch.equal(b["cf_mask"], b2["cf_mask"])
        for text, cf, has in zip(b["text"], b["cf_text"], b["cf_mask"], strict=True):
            caption = words(text)
            if not has:
                assert not re.search(r"\d", caption) and not cf.any()
                continue
            n_twins += 1
            assert cf.shape[0] == 3
            k = int(re.search(r"of (\d+) ", caption).group(1))
            new = set()
            for twin in map(words, cf):
                k2 = int(re.search(r"of (\d+) ", twin).group(1))
                assert k != k2 and 1 <= k2 <= 10
                norm = (lambda c: re.sub(r"of \d+ (\w+?) fields?", r"of N \1 field", c))
                assert norm(caption) == norm(twin)
                assert twin.strip().endswith("field" if k2 == 1 else "fields")
                new.add(k2)
            assert len(new) == 3
    assert n_twins >= 8
    assert "cf_text" not in next(_stream(counted, batch=6))
    assert "cf_target" not in batches[0]  # --count-sigma 0: the one-hot target, implied

    # --count-sigma: each row's soft target is soft_targets(true, twins' counts), same stream
    from trainer.counts import soft_targets

    soft = [b for _, b in zip(range(4), _stream(counted, batch=6, counterfactuals=3,
                                                count_sigma=0.3), strict=False)]
    n_soft = 0
    for b, b0 in zip(soft, batches, strict=True):
        assert torch.equal(b["cf_text"], b0["cf_text"])  # the target changes, not the twins
        for text, cf, has, q in zip(b["text"], b["cf_text"], b["cf_mask"], b["cf_target"],
                                    strict=True):
            if not has:
                assert q.tolist() == [1.0, 0.0, 0.0, 0.0]
                continue
            n_soft += 1
            k = int(re.search(r"of (\d+) ", words(text)).group(1))
            twins = [int(re.search(r"of (\d+) ", words(t)).group(1)) for t in cf]
            assert torch.allclose(q, torch.tensor(soft_targets(k, twins, 0.3)))
            assert int(q.argmax()) == 0 and math.isclose(float(q.sum()), 1.0, rel_tol=1e-6)
    assert n_soft == n_twins


def test_mix_weights_select_subsets(corpus):
    it = _stream(corpus, mix={"pub11": 0.0, "rs3": 1.0}, batch=8)
    keys = [k for _ in range(3) for k in next(it)["keys"]]
    assert keys and all(k.startswith("rs3") for k in keys)


def test_stream_deterministic_and_resumable(corpus):
    a = _stream(corpus, seed=3)
    first = [next(a) for _ in range(6)]
    b = _stream(corpus, seed=3)
    again = [next(b) for _ in range(6)]
    assert [x["keys"] for x in first] == [x["keys"] for x in again]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(first, again, strict=True))
    # fast-forward to where batch 3 ended: the rest of the stream is identical
    c = _stream(corpus, seed=3, start={0: first[2]["next_position"]})
    rest = [next(c) for _ in range(3)]
    assert [x["keys"] for x in rest] == [x["keys"] for x in first[3:]]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(rest, first[3:], strict=True))
    other = _stream(corpus, seed=4)
    assert [next(other)["keys"] for _ in range(2)] != [x["keys"] for x in first[:2]]


def test_pipe_urls_stream_like_local_paths(corpus):
    from trainer.data import expand_urls

    urls = expand_urls(str(corpus))
    piped = "::".join(f"pipe:cat {u}" for u in urls)
    a, b = _stream(corpus, seed=1), _stream(piped, seed=1)
    assert [next(a)["keys"] for _ in range(3)] == [next(b)["keys"] for _ in range(3)]


def test_ranks_read_disjoint_samples(corpus):
    seen = []
    for rank in (0, 1):
        it = _stream(corpus, rank=rank, world=2, batch=4)
        seen.append({k for _ in range(6) for k in next(it)["keys"]})
    assert seen[0] and seen[1] and not (seen[0] & seen[1])


def test_corrupt_samples_counted_and_long_captions_reported(corpus):
    from trainer.data import CaptionTokenizer

    it = _stream(corpus, mix={"pub11": 1.0}, batch=8)  # pub11-00000 holds both oddities
    batches = [next(it) for _ in range(12)]  # > 2 passes over 48 pub11 samples
    assert max(b["n_errors"] for b in batches) >= 1
    keys = {k for b in batches for k in b["keys"]}
    assert not any(k.startswith("pub110000001") for k in keys)  # the corrupt one
    tok = CaptionTokenizer(_tokenizer())
    tokens, n = tok(LONG_CAPTION)
    assert n > 77 and tokens.shape == (77,) and int(tokens[-1]) == tok.tokenizer.eot_token_id
    assert torch.equal(tokens, _tokenizer()([LONG_CAPTION])[0])  # same as open_clip's
    short, n_short = tok("a red field")
    assert n_short == 5 and torch.equal(short, _tokenizer()(["a red field"])[0])
    n_long = sum(1 for k in keys if k.startswith("pub110000002"))
    assert n_long == 1
    assert sum(b["n_over_context"] for b in batches) >= 1


def test_augment_is_deterministic_and_shaped():
    from trainer.augment import RSAugment

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 60, 3), np.uint8))
    aug = RSAugment(32, [0.5] * 3, [0.25] * 3, rotate_any=True)
    x1, x2 = aug(img, random.Random(7)), aug(img, random.Random(7))
    assert x1.shape == (3, 32, 32) and torch.equal(x1, x2)
    xs = [aug(img, random.Random(s)) for s in range(8)]
    assert len({float(x.sum()) for x in xs}) > 1


# ---------------------------------------------------------------------- optim / loss


def test_optimizer_groups_and_schedule(tiny_model_dir):
    from trainer.model import build_model
    from trainer.optim import build_optimizer, cosine_lr

    built = build_model(tiny_model_dir)
    opt = build_optimizer(built.model, 1e-3, 0.2)
    names = {id(p): n for n, p in built.model.named_parameters()}
    no_wd = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    wd = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert {"logit_scale", "token_embedding.weight", "positional_embedding",
            "visual.class_embedding", "visual.positional_embedding", "ln_final.weight",
            "ln_final.bias"} <= no_wd
    assert "visual.transformer.resblocks.0.mlp.c_fc.weight" in wd
    assert "text_projection" in wd and not any("bias" in n or "ln_" in n for n in wd)
    assert len(no_wd) + len(wd) == sum(1 for _ in built.model.parameters())
    assert cosine_lr(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert cosine_lr(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert cosine_lr(55, 1.0, 10, 100) == pytest.approx(0.5)
    assert cosine_lr(100, 1.0, 10, 100) == pytest.approx(0.0)


def test_clip_and_siglip_losses_from_open_clip(tiny_model_dir):
    from open_clip.loss import ClipLoss, SigLipLoss

    from trainer.loss import build_loss, clamp_logit_scale, contrastive_loss
    from trainer.model import build_model

    built = build_model(tiny_model_dir, loss="siglip")
    assert built.model.logit_bias is not None and built.model_cfg["init_logit_bias"] == -10.0
    x, t = torch.randn(4, 3, 64, 64), _tokenizer()(["a", "b", "c", "d"])
    assert isinstance(build_loss("clip"), ClipLoss) and build_loss("clip").local_loss
    assert isinstance(build_loss("siglip"), SigLipLoss)
    loss = contrastive_loss(build_loss("siglip"), built.model(x, t))
    assert torch.isfinite(loss)
    with torch.no_grad():
        built.model.logit_scale.fill_(10.0)
    clamp_logit_scale(built.model)
    assert float(built.model.logit_scale.detach().exp()) == pytest.approx(100.0)


# ------------------------------------------------------------------------------ PEFT


def _cfg_numbers(cfg):
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    return (v["width"], v["layers"], v.get("mlp_ratio", 4.0)), (t["width"], t["layers"],
                                                                 t.get("mlp_ratio", 4.0))


def test_lora_trains_exactly_the_lora_matrices(tiny_model_dir):
    from trainer.model import build_model, count_parameters

    r = 4
    built = build_model(tiny_model_dir, peft="lora", lora_r=r, lora_alpha=8)
    trainable, total = count_parameters(built.model)
    expected = 0
    for width, layers, ratio in _cfg_numbers(built.model_cfg):
        hidden = int(width * ratio)
        per_block = (
            r * (width + 3 * width)      # in_proj (packed q, k, v) of nn.MultiheadAttention
            + r * (width + width)        # out_proj
            + r * (width + hidden)       # mlp.c_fc
            + r * (hidden + width)       # mlp.c_proj
        )
        expected += layers * per_block
    assert trainable == expected
    names = [n for n, p in built.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert total > 100 * trainable


def test_adapter_trains_exactly_the_adapters(tiny_model_dir):
    from trainer.model import build_model, count_parameters

    h = 8
    built = build_model(tiny_model_dir, peft="adapter", adapter_dim=h)
    trainable, _ = count_parameters(built.model)
    expected = sum(layers * (width * h + h + h * width + width)
                   for width, layers, _ in _cfg_numbers(built.model_cfg))
    assert trainable == expected
    assert all("mlp_adapter" in n for n, p in built.model.named_parameters() if p.requires_grad)
    # zero-init: the adapted model starts as the plain model
    from pipelines.models.open_clip_loader import load_open_clip

    plain, _, _ = load_open_clip(tiny_model_dir)
    built.model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(built.model.encode_image(x), plain.encode_image(x), atol=1e-6)


def test_lock_towers(tiny_model_dir):
    from trainer.model import build_model, count_parameters

    built = build_model(tiny_model_dir, peft="lock-image")
    visual = sum(p.numel() for p in built.model.visual.parameters())
    trainable, total = count_parameters(built.model)
    assert trainable == total - visual
    built = build_model(tiny_model_dir, peft="lock-text")
    trainable, _ = count_parameters(built.model)
    visual = sum(p.numel() for p in built.model.visual.parameters())
    assert trainable == visual + built.model.logit_scale.numel()


# ------------------------------------------------------------------------ checkpoints


def test_atomic_save_leaves_no_temp_files(tmp_path):
    from trainer.checkpoint import atomic_save, resolve_resume, save_training_checkpoint

    atomic_save({"a": torch.ones(2)}, str(tmp_path / "x.pt"))
    latest = save_training_checkpoint({"step": 3}, str(tmp_path / "checkpoints"), 3)
    assert os.path.isfile(latest) and not os.path.islink(latest)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest.pt", "step_00000003.pt"]
    assert resolve_resume("latest", str(tmp_path)) == latest
    assert resolve_resume("latest", str(tmp_path / "nothing")) is None
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_shard_images_are_opened_with_the_format_allow_list():
    """The trainer decodes shard images through the pipelines' guard: a TGA or ICO member (a
    hostile or foreign shard) is a skipped, counted sample, never decoded."""
    from pipelines.image_guard import ImageRefused
    from trainer.data import _decode

    ok = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(ok, "JPEG")
    img, text = _decode({"__key__": "k", "jpg": ok.getvalue(), "txt": b"a field"})
    assert img.size == (16, 16) and text == "a field"
    for fmt in ("TGA", "ICO"):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buf, fmt)
        with pytest.raises(ImageRefused, match="not_an_image|one of"):
            _decode({"__key__": "k", "jpg": buf.getvalue(), "txt": b"x"})
