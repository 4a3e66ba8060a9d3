"""Our zero-shot and retrieval numbers agree with CLIP_benchmark's on the same model, images and
templates (the tiny CLIP of the demo world, held-out demo scenes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.demo import scenes
from trainer.bench import protocols as P
from trainer.bench.models import BenchModel, ModelSpec
from trainer.bench.registry import fill_template, normalise_classname, prompt_templates

cb_zs = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
cb_ret = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> BenchModel:
    from pipelines.demo.tiny_models import build_tiny_clip

    d = build_tiny_clip(str(tmp_path_factory.mktemp("models") / "tiny-clip"), seed=0)
    return BenchModel(ModelSpec("tiny", d))


@pytest.fixture(scope="module")
def scene_images():
    ims, labels, caps = [], [], []
    for ci, cls in enumerate(scenes.CLASSES):
        for j in range(3):
            rng = np.random.default_rng([7, 9001, ci, j])
            im, meta = scenes.render_scene(cls, rng, 96)
            ims.append(im)
            labels.append(ci)
            caps.append([scenes.caption_scene(cls, meta, rng) for _ in range(3)])
    return ims, np.asarray(labels), caps


class _ClsSet(torch.utils.data.Dataset):
    def __init__(self, ims, labels, preprocess, classes):
        self.ims, self.labels, self.pp, self.classes = ims, labels, preprocess, classes

    def __len__(self):
        return len(self.ims)

    def __getitem__(self, i):
        return self.pp(self.ims[i]), int(self.labels[i])


class _RetSet(_ClsSet):
    def __getitem__(self, i):
        return self.pp(self.ims[i]), self.labels[i]


def _accuracy_numpy2(output, target, topk=(1,)):
    """clip_benchmark 1.6.2's ``accuracy`` line for line, except the scalar conversion:
    ``float()`` of a 1-element array raises under numpy >= 2.4 (their code predates it)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [float(correct[:k].reshape(-1).float().sum().item()) / n for k in topk]


@pytest.mark.parametrize("prompt_set", ["skyscript", "clip"])
def test_zeroshot_agrees_with_clip_benchmark(tiny, scene_images, prompt_set, monkeypatch):
    monkeypatch.setattr(cb_zs, "accuracy", _accuracy_numpy2)
    ims, labels, _ = scene_images
    classnames = [normalise_classname(c, "demo-scenes") for c in scenes.CLASSES]
    templates = prompt_templates(prompt_set)
    dl = torch.utils.data.DataLoader(_ClsSet(ims, labels, tiny.preprocess, classnames),
                                     batch_size=16)
    theirs = cb_zs.evaluate(tiny.net, dl, tiny.tokenizer, classnames, templates, "cpu",
                            amp=False)
    x = tiny.embed_images(ims)
    t = tiny.embed_texts([fill_template(tp, c) for c in classnames for tp in templates])
    ours = P.zeroshot(x, t.reshape(len(classnames), len(templates), -1), labels)
    assert ours["top1"] == pytest.approx(100 * theirs["acc1"], abs=1e-3)
    assert ours["top5"] == pytest.approx(100 * theirs["acc5"], abs=1e-3)
    assert ours["mean_per_class_recall"] == pytest.approx(
        100 * theirs["mean_per_class_recall"], abs=1e-3)


def test_retrieval_agrees_with_clip_benchmark(tiny, scene_images):
    ims, _, caps = scene_images
    ds = _RetSet(ims, caps, tiny.preprocess, None)
    dl = torch.utils.data.DataLoader(
        ds, batch_size=10,
        collate_fn=lambda b: (torch.stack([x[0] for x in b]), [x[1] for x in b]))
    theirs = cb_ret.evaluate(tiny.net, dl, tiny.tokenizer, "cpu", amp=False,
                             recall_k_list=[1, 5, 10])
    x = tiny.embed_images(ims)
    flat = [c for cs in caps for c in cs]
    owner = np.repeat(np.arange(len(ims)), [len(cs) for cs in caps])
    ours = P.retrieval(x, tiny.embed_texts(flat), owner)
    for k in (1, 5, 10):
        # CLIP_benchmark: "image_retrieval" = text→image, "text_retrieval" = image→text
        assert ours[f"t2i_R@{k}"] == pytest.approx(
            100 * theirs[f"image_retrieval_recall@{k}"], abs=1e-3)
        assert ours[f"i2t_R@{k}"] == pytest.approx(
            100 * theirs[f"text_retrieval_recall@{k}"], abs=1e-3)
