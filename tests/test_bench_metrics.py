"""Every bench metric on small cases whose answer can be checked by hand: a perfect model, a
reversed one, and ties (which count against the model; see trainer/bench/protocols.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from trainer.bench import protocols as P
from trainer.bench import report
from trainer.bench.datasets import (
    guess_task,
    load_classification,
    load_counting,
    load_retrieval,
    load_selo,
)
from trainer.bench.models import FeatureCache
from trainer.bench.registry import (
    KNOWN,
    fill_template,
    normalise_classname,
    prompt_sets,
    prompt_templates,
    resolve,
)

EYE3 = np.eye(3, dtype=np.float32)


# ----------------------------------------------------------------------------- ranking / ties


def test_rank_tie_rule_counts_ties_against_the_model():
    s = np.array([[0.5, 0.5, 0.1], [0.9, 0.2, 0.9], [0.3, 0.2, 0.1]])
    # row 0: true 0 ties with 1 -> rank 1; row 1: true 2 ties with 0 -> rank 1; row 2: clear win
    assert P.rank_of_true(s, np.array([0, 2, 0])).tolist() == [1, 1, 0]


# ----------------------------------------------------------------------------- zero-shot


def test_zeroshot_perfect_reversed_and_constant():
    text = EYE3[:, None, :]  # 3 classes x 1 template
    labels = np.array([0, 1, 2])
    perfect = P.zeroshot(EYE3, text, labels)
    assert perfect["top1"] == 100.0 and perfect["mean_per_class_recall"] == 100.0
    assert "top5" not in perfect  # only 3 classes: top-5 is not reported
    # reversed: every image looks most like the next class, least like its own
    img = np.roll(EYE3, 1, axis=0) * 0.9 + np.roll(EYE3, 2, axis=0) * 0.1
    rev = P.zeroshot(img, text, labels)
    assert rev["top1"] == 0.0 and rev["mean_per_class_recall"] == 0.0
    # a collapsed model (every score equal) gets nothing at top-1 but everything at top-C
    const = np.ones((3, 3), np.float32) / math.sqrt(3)
    m = P.classification_metrics(const @ EYE3.T, labels, ks=(1, 3))
    assert m["top1"] == 0.0 and m["top3"] == 100.0


def test_classification_metrics_hand_case():
    # 4 images, 6 classes; true classes 0,0,0,1; image 0 right, images 1-2 wrong, image 3 right
    s = np.zeros((4, 6))
    s[0, 0] = 1
    s[1, 5], s[1, 4], s[1, 3], s[1, 2], s[1, 1], s[1, 0] = 6, 5, 4, 3, 2, 1  # true at rank 5
    s[2, 1], s[2, 0] = 2, 1  # true at rank 1
    s[3, 1] = 1
    m = P.classification_metrics(s, np.array([0, 0, 0, 1]))
    assert m["top1"] == 50.0
    assert m["top5"] == 75.0  # image 1's true class is 6th
    assert m["mean_per_class_recall"] == pytest.approx(100 * (1 / 3 + 1) / 2)


def test_mean_per_class_recall_is_balanced_accuracy():
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(0)
    s = rng.normal(size=(200, 7))
    y = rng.integers(0, 7, 200)
    m = P.classification_metrics(s, y)
    assert m["mean_per_class_recall"] == pytest.approx(
        100 * balanced_accuracy_score(y, s.argmax(1)))
    assert m["top1"] == pytest.approx(100 * np.mean(s.argmax(1) == y))


def test_prompt_ensemble_is_mean_of_normalised_then_renormalised():
    t = np.array([[[2.0, 0.0], [0.0, 1.0]]])  # one class, two templates
    w = P.zeroshot_weights(t)
    assert np.allclose(w, [[1 / math.sqrt(2), 1 / math.sqrt(2)]])


# ----------------------------------------------------------------------------- retrieval


def _two_by_two():
    img = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    txt = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], np.float32)
    return img, txt, np.array([0, 0, 1, 1])


def test_retrieval_perfect_reversed_ties():
    img, txt, owner = _two_by_two()
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    perfect = P.retrieval(img, txt, owner)
    assert all(v == 100.0 for v in perfect.values())
    rev = P.retrieval(img[::-1].copy(), txt, owner)
    assert rev["i2t_R@1"] == 0.0 and rev["t2i_R@1"] == 0.0
    assert rev["i2t_R@5"] == 100.0 and rev["t2i_R@5"] == 100.0  # only 2 images / 4 texts
    assert rev["mean_recall"] == pytest.approx((0 + 100 + 100) * 2 / 6)
    tie = P.retrieval(np.ones((2, 2)), np.ones((4, 2)), owner)
    assert tie["i2t_R@1"] == 0.0 and tie["t2i_R@1"] == 0.0


def test_retrieval_hand_case_recall_at_k():
    # 3 images, one caption each; caption similarities chosen so that
    # image 0: own caption 1st; image 1: own caption 2nd; image 2: own caption 3rd
    sim = np.array([[0.9, 0.1, 0.0], [0.8, 0.7, 0.0], [0.9, 0.8, 0.7]])
    owner = np.array([0, 1, 2])
    # embeddings that give exactly these dot products: image i = row i, texts = identity
    m = P.retrieval(sim, np.eye(3), owner, ks=(1, 2, 3))
    assert m["i2t_R@1"] == pytest.approx(100 / 3)
    assert m["i2t_R@2"] == pytest.approx(200 / 3)
    assert m["i2t_R@3"] == 100.0
    # text -> image: caption 0's column [0.9,0.8,0.9] ties image 2 with image 0 -> rank 1
    # caption 1's column [0.1,0.7,0.8] -> rank 1; caption 2's [0,0,0.7] -> rank 0
    assert m["t2i_R@1"] == pytest.approx(100 / 3)
    assert m["t2i_R@2"] == 100.0


# ----------------------------------------------------------------------------- probes


def _clusters(n_per=10, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.eye(8)[:classes] * 5
    x = np.concatenate([c + rng.normal(0, 0.3, (n_per, 8)) for c in centres])
    y = np.repeat(np.arange(classes), n_per)
    return x.astype(np.float32), y


def test_stratified_split_keeps_every_class_on_both_sides():
    _, y = _clusters(5)
    tr, te = P.stratified_split(y, 0.4, seed=0)
    assert set(y[tr]) == set(y[te]) == {0, 1, 2}
    assert len(set(tr) & set(te)) == 0 and len(tr) + len(te) == len(y)


def test_linear_probe_knn_fewshot_on_separable_data():
    x, y = _clusters(12)
    tr, te = P.stratified_split(y, 0.5, seed=0)
    lp, c = P.linear_probe(x[tr], y[tr], x[te], y[te], 3)
    assert lp["top1"] == 100.0 and c in P.DEFAULT_CS
    assert P.knn(x[tr], y[tr], x[te], y[te], 3, k=3)["top1"] == 100.0
    fs = P.fewshot(x[tr], y[tr], x[te], y[te], 3, shots=(1, 2, 4, 32), seeds=(0, 1))
    assert set(fs) == {1, 2, 4}  # 32 > 6 training images per class: skipped
    assert all(v["top1"] == 100.0 and v["seeds"] == 2 for v in fs.values())


def test_knn_reversed_labels_and_vote_ties():
    x, y = _clusters(6)
    tr, te = P.stratified_split(y, 0.5, seed=0)
    wrong = (y[tr] + 1) % 3  # training labels shifted: every neighbour votes for the wrong class
    assert P.knn(x[tr], wrong, x[te], y[te], 3, k=3)["top1"] == 0.0
    # k=2 with one neighbour of each class: the closer one wins
    train = np.array([[1.0, 0.0], [0.6, 0.8]])
    m = P.knn(train, np.array([0, 1]), np.array([[0.96, 0.28]]), np.array([0]), 2, k=2)
    assert m["top1"] == 100.0


# ----------------------------------------------------------------------------- counting


def test_swap_count_digits_words_and_plurals():
    assert P.swap_count("an aerial image of a lake with 1 boat", 1, 3) == \
        "an aerial image of a lake with 3 boats"
    assert P.swap_count("a parking lot with 4 cars", 4, 1) == "a parking lot with 1 car"
    assert P.swap_count("There are three planes.", 3, 7) == "There are 7 planes."
    assert P.swap_count("a harbor with 10 boats", 10, 2) == "a harbor with 2 boats"
    caps = P.counting_captions("a beach with 2 umbrellas", 2)
    assert len(caps) == 10 and caps[0] == "a beach with 1 umbrella" and caps[1].endswith("2 umbrellas")
    with pytest.raises(ValueError):
        P.swap_count("no number here", 4, 5)


def test_counting_perfect_reversed_ties():
    counts = np.array([1, 5, 10])
    cand = np.tile(np.eye(10)[None], (3, 1, 1))  # candidate n -> basis vector n-1
    img = np.eye(10)[counts - 1]
    perfect = P.counting(img, cand, counts)
    assert perfect["top1"] == 100.0 and perfect["top10"] == 100.0
    # reversed: the image looks like the count it is not, and least like its own
    rev_img = 1.0 - img
    rev = P.counting(rev_img, cand, counts)
    assert rev["top1"] == 0.0 and rev["top9"] == 0.0 and rev["top10"] == 100.0
    tie = P.counting(np.ones((3, 10)), cand, counts)
    assert tie["top9"] == 0.0 and tie["top10"] == 100.0


def test_counting_prior_is_leave_one_out_and_pessimistic():
    cats = ["car", "car", "car", "ship", "ship", "tank"]
    counts = np.array([3, 3, 7, 2, 5, 4])
    m = P.counting_prior(cats, counts)
    # car 3: the other cars say 3 once, 7 once -> a tie, counted against it (rank 1);
    # car 7: the others say 3 twice -> 7 scores 0 like eight other candidates (rank 9);
    # ships: each sees only the other's count (rank 9); the lone tank sees nothing (rank 9)
    assert m["top1"] == 0.0 and m["top2"] == pytest.approx(200 / 6) and m["top9"] == m["top2"]
    assert m["top10"] == 100.0
    # one category whose items mostly share a count: the majority wins on the prior alone
    m = P.counting_prior(["bridge"] * 4 + ["car"], np.array([1, 1, 1, 2, 9]))
    assert m["top1"] == 60.0  # the three 1s; the 2 and the lone car never


def test_within_category_r_tells_counting_from_knowing_the_category():
    cand = np.tile(np.eye(10)[None], (6, 1, 1))  # candidate n -> basis vector n-1
    cats = ["car"] * 4 + ["tank"] * 2
    counts = np.array([2, 4, 6, 8, 1, 3])
    # a model that counts: picks the true count everywhere
    assert P.counting_within_category_r(np.eye(10)[counts - 1], cand, cats, counts) == \
        pytest.approx(1.0)
    # one that knows each category's usual count: the same pick per category, top-1 above 0
    usual = np.eye(10)[np.array([6, 6, 6, 6, 1, 1]) - 1]
    assert P.counting(usual, cand, counts)["top1"] > 0
    assert P.counting_within_category_r(usual, cand, cats, counts) == 0.0
    # backwards within cars (r = -1, 4 items), right on tanks (r = 1, 2 items): (-4 + 2) / 6
    back = np.eye(10)[np.array([8, 6, 4, 2, 1, 3]) - 1]
    assert P.counting_within_category_r(back, cand, cats, counts) == pytest.approx(-1 / 3)
    # a category whose true counts are all equal says nothing; none left: NaN
    assert math.isnan(P.counting_within_category_r(
        np.eye(10)[[0, 0]], cand[:2], ["bridge", "bridge"], np.array([1, 1])))


# ----------------------------------------------------------------------------- SeLo


SQUARE = [np.array([[60, 60], [140, 60], [140, 140], [60, 140]], float)]


def test_selo_perfect_map():
    prob = P.polygon_mask((200, 200), SQUARE)
    m = P.selo_metrics(prob, SQUARE, box=5, peak=400)
    assert m["Rsu"] == pytest.approx(1.0)
    assert m["Ras"] == pytest.approx(0.0, abs=0.01)
    assert m["Rda"] == 1.0
    assert m["Rmi"] == pytest.approx(1.0, abs=0.01)


def test_selo_uniform_map_rsu_and_misplaced_map():
    m = P.selo_metrics(np.full((200, 200), 0.5), SQUARE, box=5, peak=400)
    assert m["Rsu"] == pytest.approx(1 - math.exp(-0.707), abs=1e-3)  # no contrast at all
    far = [np.array([[0, 0], [30, 0], [30, 30], [0, 30]], float)]
    prob = P.polygon_mask((200, 200), far)  # attention in a corner, far from the region
    m = P.selo_metrics(prob, SQUARE, box=5, peak=400)
    assert m["Rsu"] == pytest.approx(0.0, abs=1e-6)
    assert m["Ras"] == pytest.approx(1.0) and m["Rda"] == 0.0
    assert m["Rmi"] == pytest.approx(0.0, abs=1e-6)


def test_selo_windows_and_probmap():
    wins = P.selo_windows(300, 400, (256, 128))
    assert all(x1 <= 400 and y1 <= 300 for _, _, x1, y1 in wins)
    assert (144, 44, 400, 300) in wins  # flush with the border
    prob = P.selo_probmap(300, 400, wins, np.arange(len(wins), dtype=float))
    assert prob.min() == 0.0 and prob.max() == 1.0


# ----------------------------------------------------------------------------- registry


@pytest.mark.parametrize("folder,name", [
    ("denseresidential", "dense residential"), ("AnnualCrop", "annual crop"),
    ("parking_lot", "parking lot"), ("SeaLake", "sea lake"), ("Baseball-Field", "baseball field"),
    ("river", "river"), ("storage_tanks", "storage tanks"), ("BareLand", "bare land"),
    ("golf_course", "golf course"), ("intersection", "intersection"),
])
def test_normalise_classname(folder, name):
    assert normalise_classname(folder) == name


def test_prompt_sets():
    assert prompt_templates("remoteclip") == ["a satellite photo of {c}."]
    assert prompt_templates("skyscript") == ["a satellite photo of {c}.", "a satellite image of {c}"]
    geo = prompt_templates("georsclip")
    assert len(geo) == 105 and len(set(geo)) == 105 and all("{c}" in t for t in geo)
    for phr in ("remote sensing image", "aerial image", "satellite image"):
        assert sum(phr in t for t in geo) == 35
    assert {"clip", "clip-eurosat"} <= set(prompt_sets())
    assert fill_template("a satellite photo of {}.", "river") == "a satellite photo of river."


def test_registry_resolves_known_and_adhoc(tmp_path):
    spec, path = resolve("AID", "/data/rs")
    assert spec.task == "classification" and spec.split == "whole" and str(path) == "/data/rs/AID"
    assert KNOWN["RSICD"].split == "test" and KNOWN["UCM-captions"].published == "UCM"
    (tmp_path / "a").mkdir()
    spec, path = resolve(f"mine={tmp_path}", "/x")
    assert spec.name == "mine" and spec.task == "classification" and path == tmp_path
    with pytest.raises(KeyError):
        resolve("nope", "/x")


# ----------------------------------------------------------------------------- loaders


def _img(p):
    from PIL import Image

    p.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(p)


def test_loaders(tmp_path):
    for c in ("denseresidential", "parking_lot"):
        for i in range(3):
            _img(tmp_path / "cls" / c / f"{i}.jpg")
    d = load_classification(tmp_path / "cls", "X")
    assert d.classnames == ["dense residential", "parking lot"] and len(d.paths) == 6
    assert set(d.splits) == {"whole"} and d.labels.tolist() == [0, 0, 0, 1, 1, 1]
    (tmp_path / "cls" / "split.json").write_text(json.dumps(
        {"train": ["parking_lot/0.jpg", "denseresidential/0.jpg"],
         "test": ["parking_lot/1.jpg", "denseresidential/1.jpg"]}))
    d = load_classification(tmp_path / "cls", "X", split="split.json")
    assert len(d.indices("train")) == 2 and len(d.indices("test")) == 2

    _img(tmp_path / "ret" / "images" / "a.jpg")
    _img(tmp_path / "ret" / "images" / "b.jpg")
    (tmp_path / "ret" / "dataset_x.json").write_text(json.dumps({"images": [
        {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "a"}] * 5},
        {"filename": "b.jpg", "split": "test",
         "sentences": [{"raw": f"b{i}"} for i in range(5)]}]}))
    r = load_retrieval(tmp_path / "ret", "R", "test")
    assert len(r.paths) == 1 and r.captions == [f"b{i}" for i in range(5)]
    assert r.caption_image.tolist() == [0] * 5 and r.paths[0].name == "b.jpg"
    assert guess_task(tmp_path / "ret") == "retrieval"

    _img(tmp_path / "cnt" / "images" / "c.jpg")
    (tmp_path / "cnt" / "ann.json").write_text(json.dumps(
        [{"filename": "c.jpg", "category": "car", "count": 3, "caption": "3 cars"}]))
    c = load_counting(tmp_path / "cnt", "C")
    assert c.counts.tolist() == [3] and guess_task(tmp_path / "cnt") == "counting"

    _img(tmp_path / "selo" / "imgs" / "s.jpg")
    (tmp_path / "selo" / "anno.json").write_text(json.dumps(
        [{"jpg_name": "s.jpg", "caption": "a road", "points": [[[0, 0], [4, 0], [4, 4]]]}]))
    s = load_selo(tmp_path / "selo", "S")
    assert s.queries == ["a road"] and s.regions[0][0].shape == (3, 2)
    assert guess_task(tmp_path / "selo") == "selo"


# ----------------------------------------------------------------------------- cache, report


def test_feature_cache_roundtrip_without_pickle(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return np.arange(6, dtype=np.float32).reshape(2, 3)

    c = FeatureCache(tmp_path, "abc", "ds")
    a = c.get("images", "fp1", compute)
    c2 = FeatureCache(tmp_path, "abc", "ds")
    b = c2.get("images", "fp1", compute)
    assert len(calls) == 1 and np.array_equal(a, b) and c2.hits == 1
    c2.get("images", "fp2", compute)  # the dataset changed: recomputed
    assert len(calls) == 2
    with np.load(tmp_path / "abc" / "ds.npz", allow_pickle=False) as z:
        assert z["images"].dtype == np.float32 and str(z["images.fp"]) == "fp2"


def test_report_puts_published_figure_beside_ours(tmp_path):
    rec = {"model": "RemoteCLIP-ViT-B-32", "model_key": "k", "dataset": "AID",
           "published_dataset": "AID", "task": "classification", "protocol": "zeroshot",
           "metric": "top1", "value": 12.5, "unit": "percent",
           "params": {"prompt_set": "remoteclip"}}
    fs = [dict(rec, protocol="fewshot", value=v, params={"shots": s, "std": 0.0})
          for s, v in ((1, 10.0), (2, 20.0))]
    files = report.write(tmp_path, [rec] + fs, [{"name": "RemoteCLIP-ViT-B-32"}])
    md = (tmp_path / "results.md").read_text()
    pub = [r for r in report.load_published() if r["model"] == "RemoteCLIP"
           and r["backbone"] == "ViT-B-32" and r["dataset"] == "AID" and r["task"] == "zeroshot"]
    assert pub and f"{pub[0]['value']} ({pub[0]['paper']}" in md and "12.50" in md
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["results"][0]["params"]["prompt_set"] == "remoteclip"
    assert (tmp_path / "fewshot.png").stat().st_size > 1000 and "fewshot" in files
