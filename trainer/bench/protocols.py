"""The evaluation protocols as pure functions of embeddings (numpy in, floats out).

Embeddings are L2-normalised float32 rows; similarity is the dot product. Scores are in percent
(0-100) as the papers print them, except SeLo's (0-1, as the SeLo paper prints them).

**Tie rule (every ranking metric here).** Ties count against the model: the rank of the right
answer is the number of *wrong* candidates whose score is greater than **or equal to** its
score, and a hit at k means rank < k. A model that gives every candidate the same score
therefore scores 0 at top-1 (not 1/C, not 100%), and no metric can be gamed by collapsing the
embeddings. Where no scores tie — every real model with float embeddings — this is exactly
``torch.topk``'s answer, which is what CLIP_benchmark and open_clip use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from trainer import counts

# ----------------------------------------------------------------------------- ranking


def rank_of_true(scores: np.ndarray, true_idx: np.ndarray) -> np.ndarray:
    """Per row, how many other columns score >= the true column (the pessimistic rank)."""
    scores = np.asarray(scores, np.float64)
    rows = np.arange(scores.shape[0])
    s_true = scores[rows, true_idx]
    return (scores >= s_true[:, None]).sum(axis=1) - 1


def rank_of_best_positive(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Per row, how many negatives score >= the best-scoring positive of that row.

    ``positive`` is a boolean matrix like ``scores``; a row hits at k iff rank < k, i.e. at
    least one positive is in the top k (retrieval recall@k as CLIP-style papers define it).
    """
    scores = np.asarray(scores, np.float64)
    best = np.where(positive, scores, -np.inf).max(axis=1)
    return ((scores >= best[:, None]) & ~positive).sum(axis=1)


def _pct(x: np.ndarray) -> float:
    return float(100.0 * np.mean(x)) if len(x) else float("nan")


# ----------------------------------------------------------------------------- zero-shot


def zeroshot_weights(text_emb: np.ndarray) -> np.ndarray:
    """[C, T, D] normalised prompt embeddings → [C, D] class weights: the mean over the T
    templates, re-normalised (CLIP's and CLIP_benchmark's prompt ensembling)."""
    w = np.asarray(text_emb, np.float64)
    w = w / np.linalg.norm(w, axis=-1, keepdims=True).clip(1e-12)
    w = w.mean(axis=1)
    return (w / np.linalg.norm(w, axis=-1, keepdims=True).clip(1e-12)).astype(np.float32)


def classification_metrics(scores: np.ndarray, labels: np.ndarray,
                           ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """top-k accuracy (k <= number of classes only) and mean per-class recall, in percent.

    Mean per-class recall is the mean over classes present in ``labels`` of their top-1
    accuracy (sklearn's ``balanced_accuracy_score``, with the tie rule above).
    """
    labels = np.asarray(labels)
    rank = rank_of_true(scores, labels)
    out: dict[str, float] = {}
    n_classes = scores.shape[1]
    for k in ks:
        if k <= n_classes:
            out[f"top{k}"] = _pct(rank < k)
    hit = rank == 0
    out["mean_per_class_recall"] = float(
        100.0 * np.mean([hit[labels == c].mean() for c in np.unique(labels)]))
    return out


def zeroshot(image_emb: np.ndarray, text_emb: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Zero-shot classification: ``text_emb`` [C, T, D] (class × template)."""
    return classification_metrics(image_emb @ zeroshot_weights(text_emb).T, labels)


# ----------------------------------------------------------------------------- retrieval


def retrieval(image_emb: np.ndarray, text_emb: np.ndarray, caption_image: np.ndarray,
              ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image→text (i2t) and text→image (t2i) recall@k and mean recall, in percent.

    i2t R@k: share of images with at least one of their captions in the top k texts; t2i R@k:
    share of captions whose image is in the top k images. ``mean_recall`` is the mean of the
    six numbers (RS5M / RemoteCLIP's "mR"); ``i2t_mean_recall`` / ``t2i_mean_recall`` the mean
    of each direction's three (SkyScript's table).
    """
    caption_image = np.asarray(caption_image)
    sim = np.asarray(image_emb, np.float64) @ np.asarray(text_emb, np.float64).T  # [I, T]
    pos = np.zeros(sim.shape, bool)
    pos[caption_image, np.arange(len(caption_image))] = True
    r_i2t = rank_of_best_positive(sim, pos)
    r_t2i = rank_of_true(sim.T, caption_image)
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_R@{k}"] = _pct(r_i2t < k)
    for k in ks:
        out[f"t2i_R@{k}"] = _pct(r_t2i < k)
    out["i2t_mean_recall"] = float(np.mean([out[f"i2t_R@{k}"] for k in ks]))
    out["t2i_mean_recall"] = float(np.mean([out[f"t2i_R@{k}"] for k in ks]))
    out["mean_recall"] = float(np.mean([out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks]))
    return out


# ----------------------------------------------------------------------------- probes


def stratified_split(labels: np.ndarray, test_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices, ``test_frac`` of every class in test (at least one image stays in
    train and, where the class has two or more, one goes to test)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = min(len(idx) - 1, max(1, round(len(idx) * test_frac))) if len(idx) > 1 else 0
        test += idx[:n_test].tolist()
        train += idx[n_test:].tolist()
    return np.sort(np.asarray(train, np.int64)), np.sort(np.asarray(test, np.int64))


def _logreg(C: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=1000, random_state=seed)


def _proba_scores(clf, x: np.ndarray, n_classes: int) -> np.ndarray:
    """Decision scores as [N, n_classes] (classes absent from training get -inf)."""
    s = clf.decision_function(x)
    if s.ndim == 1:  # binary
        s = np.stack([-s, s], axis=1)
    out = np.full((len(x), n_classes), -np.inf)
    out[:, clf.classes_] = s
    return out


DEFAULT_CS = tuple(10.0 ** e for e in range(-2, 5))


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, n_classes: int, Cs: Sequence[float] = DEFAULT_CS,
                 val_frac: float = 0.2, seed: int = 0) -> tuple[dict[str, float], float]:
    """Logistic regression on frozen features; C picked by top-1 on a stratified validation
    split of the training set (ties: the smaller C), then refit on all of it.
    Returns (metrics, chosen C)."""
    tr, va = stratified_split(train_y, val_frac, seed)
    best_c, best_acc = Cs[0], -1.0
    if len(va) and len(np.unique(train_y[tr])) > 1:
        for C in Cs:
            clf = _logreg(C, seed).fit(train_x[tr], train_y[tr])
            acc = float(np.mean(rank_of_true(_proba_scores(clf, train_x[va], n_classes),
                                             train_y[va]) == 0))
            if acc > best_acc + 1e-12:
                best_c, best_acc = C, acc
    clf = _logreg(best_c, seed).fit(train_x, train_y)
    return classification_metrics(_proba_scores(clf, test_x, n_classes), test_y), best_c


def knn(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
        n_classes: int, k: int = 20) -> dict[str, float]:
    """k-nearest neighbours by cosine similarity: each of the k neighbours votes 1 for its
    class; a class's score is its vote count plus 1e-3 × the summed similarity of its voters,
    so equal votes are broken by closeness (then by the tie rule above)."""
    k = min(k, len(train_x))
    sim = np.asarray(test_x, np.float64) @ np.asarray(train_x, np.float64).T
    nn = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    scores = np.zeros((len(test_x), n_classes))
    rows = np.arange(len(test_x))[:, None]
    np.add.at(scores, (np.broadcast_to(rows, nn.shape), train_y[nn]), 1.0 + 1e-3 * sim[rows, nn])
    return classification_metrics(scores, test_y)


def fewshot(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
            n_classes: int, shots: Sequence[int] = (1, 2, 4, 8, 16, 32),
            seeds: Sequence[int] = (0, 1, 2), C: float = 10.0
            ) -> dict[int, dict[str, float]]:
    """Few-shot linear probe: for each shot count n and seed, n training images per class
    drawn at random, logistic regression with a fixed ``C`` (too few images to validate one),
    top-1 on the whole test set; returns {n: {"top1": mean, "top1_std": std, "seeds": k}}.
    Shot counts larger than the smallest class's training images are skipped."""
    out: dict[int, dict[str, float]] = {}
    min_count = min(int(np.sum(train_y == c)) for c in np.unique(train_y))
    for n in shots:
        if n > min_count:
            continue
        accs = []
        for s in seeds:
            rng = np.random.default_rng([s, n])
            idx = np.concatenate([rng.choice(np.flatnonzero(train_y == c), n, replace=False)
                                  for c in np.unique(train_y)])
            if len(np.unique(train_y[idx])) < 2:
                continue
            clf = _logreg(C, s).fit(train_x[idx], train_y[idx])
            accs.append(float(np.mean(
                rank_of_true(_proba_scores(clf, test_x, n_classes), test_y) == 0)) * 100)
        if accs:
            out[n] = {"top1": float(np.mean(accs)), "top1_std": float(np.std(accs)),
                      "seeds": len(accs)}
    return out


# ----------------------------------------------------------------------------- counting

COUNT_CANDIDATES = tuple(range(1, 11))


def swap_count(caption: str, true: int, new: int) -> str:
    """``caption`` with its count (``true``, as digits or an English word) replaced by
    ``new`` in digits. The counted phrase's head noun follows the new number ("1 storage tank",
    "2 storage tanks"; never "1 cars" or "2 storages tank"), and so does an ``is``/``are`` next
    to it, so grammar gives no candidate away (``trainer/counts.py``). Raises ValueError if the
    count is not in the caption."""
    found = counts.find_counts(caption, true, true)
    if not found:
        raise ValueError(f"count {true} not found in caption {caption!r}")
    return counts.swap(caption, found[0], new, digits=True)


def counting_captions(caption: str, true: int,
                      candidates: Sequence[int] = COUNT_CANDIDATES) -> list[str]:
    return [swap_count(caption, true, n) for n in candidates]


def counting(image_emb: np.ndarray, cand_text_emb: np.ndarray, counts: np.ndarray,
             candidates: Sequence[int] = COUNT_CANDIDATES) -> dict[str, float]:
    """RemoteCount: per image the 10 captions (count 1..10 swapped in) are ranked by
    similarity; top-k = share of images whose true count is among the k best (k = 1..10)."""
    return _count_topk(_count_sims(image_emb, cand_text_emb), counts, candidates)


def _count_sims(image_emb: np.ndarray, cand_text_emb: np.ndarray) -> np.ndarray:
    """[N, candidates]: each image against its own candidate captions."""
    return np.einsum("nd,ncd->nc", np.asarray(image_emb, np.float64),
                     np.asarray(cand_text_emb, np.float64))


def _count_topk(scores: np.ndarray, counts: np.ndarray,
                candidates: Sequence[int]) -> dict[str, float]:
    """top-k of the true count among the candidates ranked by ``scores`` [N, len(candidates)]."""
    true_idx = np.asarray([list(candidates).index(int(c)) for c in counts])
    rank = rank_of_true(scores, true_idx)
    return {f"top{k}": _pct(rank < k) for k in range(1, len(candidates) + 1)}


def counting_prior(categories: Sequence[str], counts: np.ndarray,
                   candidates: Sequence[int] = COUNT_CANDIDATES) -> dict[str, float]:
    """What knowing the category alone earns on a counting set, no image looked at: each
    item's candidates ranked by how many *other* items of its category have that count
    (leave-one-out; ties against it, so a category's only item never scores). A model near
    this has learnt each category's usual count, not to count."""
    names, cat = np.unique(np.asarray(categories, dtype=str), return_inverse=True)
    own = (np.asarray(counts)[:, None] == np.asarray(list(candidates))[None, :]).astype(np.int64)
    per_category = np.zeros((len(names), own.shape[1]), np.int64)
    np.add.at(per_category, cat, own)
    return _count_topk(per_category[cat] - own, counts, candidates)  # the category's others


def counting_within_category_r(image_emb: np.ndarray, cand_text_emb: np.ndarray,
                               categories: Sequence[str], counts: np.ndarray,
                               candidates: Sequence[int] = COUNT_CANDIDATES) -> float:
    """Does the model count, or guess each category's usual count? Within each category, the
    Pearson correlation of the count the model picks (its top-1 candidate) with the true count,
    averaged over categories weighted by their items. Categories whose true counts are all
    equal say nothing and are left out; a category where the model always picks the same count
    scores 0. NaN when no category is left. A model that counts is near 1; one that knows only
    the category, near 0, whatever its top-1."""
    picked = np.asarray(list(candidates))[_count_sims(image_emb, cand_text_emb).argmax(1)]
    picked = picked.astype(np.float64)
    true = np.asarray(counts, np.float64)
    cats = np.asarray(categories, dtype=str)
    rs, weights = [], []
    for c in np.unique(cats):
        m = cats == c
        if m.sum() < 2 or true[m].std() == 0:
            continue
        rs.append(0.0 if picked[m].std() == 0 else float(np.corrcoef(picked[m], true[m])[0, 1]))
        weights.append(int(m.sum()))
    return float(np.average(rs, weights=weights)) if rs else float("nan")


# ----------------------------------------------------------------------------- SeLo

#: constants of the SeLo paper's reference implementation (SemanticLocalizationMetrics, SLM)
SELO_RSU_BETA = 0.707
SELO_RSU_EPS = 1e-7
SELO_RAS_EXPAND = 1.5
SELO_RAS_FILTER_TIMES = 5
SELO_RAS_SCALE_BETA = 3.0
SELO_RDA_ETA = 0.5
SELO_W = (0.4, 0.35, 0.25)  # Rmi = 0.4·Rsu + 0.35·(1−Ras) + 0.25·Rda


def polygon_mask(shape: tuple[int, int], polygons: Sequence[np.ndarray]) -> np.ndarray:
    from PIL import Image, ImageDraw

    im = Image.new("L", (shape[1], shape[0]), 0)
    d = ImageDraw.Draw(im)
    for poly in polygons:
        d.polygon([(float(x), float(y)) for x, y in np.asarray(poly).reshape(-1, 2)], fill=1)
    return np.asarray(im, np.float64)


def _region_center_radius(poly: np.ndarray) -> tuple[int, int, int]:
    p = np.asarray(poly, np.float64).reshape(-1, 2)
    mx, my = int(p[:, 0].sum() / len(p)), int(p[:, 1].sum() / len(p))
    r = int(np.mean(np.linalg.norm(p - np.array([mx, my]), axis=1)) * SELO_RAS_EXPAND)
    return mx, my, max(r, 1)


def selo_peaks(prob: np.ndarray, box: int = 50, peak: int = 1000) -> list[tuple[int, int]]:
    """Attention centres: the map (as 8-bit grey) box-filtered ``SELO_RAS_FILTER_TIMES``
    times with a ``box``-pixel kernel, local maxima within a ``peak``-pixel window, the
    centroids of their connected groups, kept where the original map is >= 0.5, strongest
    first. (x, y) pixels."""
    from scipy import ndimage

    g = np.asarray(prob * 255.0, np.uint8).astype(np.float64)
    for _ in range(SELO_RAS_FILTER_TIMES):
        g = np.floor(ndimage.uniform_filter(g, size=box, mode="reflect") + 0.5)
    mx = ndimage.maximum_filter(g, size=peak, mode="reflect")
    binary = (mx == g) & (g > 0)
    labels, n = ndimage.label(binary, structure=np.ones((3, 3)))
    if n == 0:
        return []
    cents = ndimage.center_of_mass(binary, labels, range(1, n + 1))
    pts = [(int(cx), int(cy)) for cy, cx in cents]
    pts.sort(key=lambda p: -prob[p[1], p[0]])
    return [p for p in pts if prob[p[1], p[0]] >= 0.5]


def selo_metrics(prob: np.ndarray, regions: Sequence[np.ndarray], box: int = 50,
                 peak: int = 1000) -> dict[str, float]:
    """Rsu, Ras, Rda, Rmi of one probability map ([H, W] in [0, 1]) against its ground-truth
    polygons, after the SeLo paper's reference implementation:

    * Rsu (↑, salient-area proportion): 1 − exp(−β · (Σ p inside / Σ p outside) ·
      (area outside / area inside)), β = 0.707.
    * Ras (↓, attention shift): each region gets a centre (mean of its vertices) and radius
      (1.5 × mean vertex distance); offset = mean distance to the attention peaks inside that
      circle (the radius if none); Ras = (e^{3·m} − 1)/(e^3 − 1), m = mean offset/radius.
    * Rda (↑, discrete attention): per region, 0 or 1 for zero or one peak inside the circle;
      for n ≥ 2 peaks 0.5·(1 − mean peak spread / radius) + e^{−0.5·(n+2)}; averaged.
    * Rmi = 0.4·Rsu + 0.35·(1 − Ras) + 0.25·Rda.

    Approximations: OpenCV's boxFilter / fillPoly are replaced by scipy's uniform_filter and
    PIL's polygon fill (edge pixels and rounding may differ by a pixel); ``box`` and ``peak``
    are the reference's pixel sizes for AIR-SLT's large images, so pass smaller ones for small
    maps.
    """
    prob = np.asarray(prob, np.float64)
    mask = polygon_mask(prob.shape, regions)
    inside = float((prob * mask).sum())
    total = float(prob.sum())
    area_in = float(mask.sum())
    H, W = prob.shape
    left = inside / (total - inside + SELO_RSU_EPS)
    right = (H * W - area_in) / max(area_in, 1.0)
    rsu = 1.0 - math.exp(-SELO_RSU_BETA * left * right)

    crs = [_region_center_radius(p) for p in regions]
    peaks = selo_peaks(prob, box, peak)
    if not peaks:
        offsets = [crs[0][2]]
    else:
        offsets = []
        for x, y, r in crs:
            d = [math.dist((x, y), p) for p in peaks]
            d = [v for v in d if v <= r]
            offsets.append(float(np.mean(d)) if d else float(r))
    m = float(np.mean([o / c[2] for o, c in zip(offsets, crs)]))
    ras = (math.exp(SELO_RAS_SCALE_BETA * m) - 1) / (math.exp(SELO_RAS_SCALE_BETA) - 1)

    rda = []
    for x, y, r in crs:
        near = [p for p in peaks if math.dist((x, y), p) <= r]
        if len(near) <= 1:
            rda.append(float(len(near)))
            continue
        c = np.mean(np.asarray(near, np.float64), axis=0)
        spread = float(np.mean([np.linalg.norm(c - np.asarray(p)) for p in near])) / r
        rda.append(0.5 * (1 - spread) + math.exp(-SELO_RDA_ETA * (len(near) + 2)))
    rda_v = float(np.mean(rda))
    rmi = SELO_W[0] * rsu + SELO_W[1] * (1 - ras) + SELO_W[2] * rda_v
    return {"Rsu": rsu, "Ras": ras, "Rda": rda_v, "Rmi": rmi}


def selo_windows(height: int, width: int, scales: Sequence[int] = (256, 512, 768)
                 ) -> list[tuple[int, int, int, int]]:
    """Sliding windows (x0, y0, x1, y1) at each scale, stride half the scale, the last window
    of a row/column flush with the image border."""
    out = []
    for s in scales:
        if s > min(height, width):
            continue
        step = max(1, s // 2)
        ys = list(range(0, height - s + 1, step))
        xs = list(range(0, width - s + 1, step))
        if ys[-1] != height - s:
            ys.append(height - s)
        if xs[-1] != width - s:
            xs.append(width - s)
        out += [(x, y, x + s, y + s) for y in ys for x in xs]
    return out


def selo_probmap(height: int, width: int, windows: Sequence[tuple[int, int, int, int]],
                 sims: np.ndarray) -> np.ndarray:
    """Heat map: every pixel gets the mean similarity of the windows covering it, min-max
    scaled to [0, 1] and quantised to 8 bits (the reference saves maps as grey JPEGs)."""
    acc = np.zeros((height, width))
    cnt = np.zeros((height, width))
    for (x0, y0, x1, y1), s in zip(windows, sims):
        acc[y0:y1, x0:x1] += s
        cnt[y0:y1, x0:x1] += 1
    heat = np.where(cnt > 0, acc / np.maximum(cnt, 1), np.nan)
    lo, hi = np.nanmin(heat), np.nanmax(heat)
    heat = np.nan_to_num((heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat), nan=0.0)
    return np.round(heat * 255.0) / 255.0
