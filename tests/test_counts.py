"""Counts in captions (trainer/counts.py): what is a count, swaps that keep the grammar, the
counterfactual twins of the counting loss, and the loss itself (trainer/loss.py)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from trainer import counts as C
from trainer.bench import protocols as P


def _found(text: str) -> list[tuple[int, str]]:
    return [(c.value, text[c.head_start:c.head_end]) for c in C.find_counts(text)]


def test_counts_in_digits_words_and_lists():
    assert _found("an aerial image of an airport with 3 airplanes") == [(3, "airplanes")]
    assert _found("Eight ships are located in the centre of the scene.") == [(8, "ships")]
    assert _found("One baseball diamond can be seen in this image.") == [(1, "diamond")]
    assert _found("There is one car and two storage tanks in the image.") == \
        [(1, "car"), (2, "tanks")]
    assert _found("a lake with 1 beach umbrella, aerial view") == [(1, "umbrella")]
    assert _found("a satellite image of ten small vehicles") == [(10, "vehicles")]


@pytest.mark.parametrize("text", [
    "taken 10 degrees off nadir, with 24% cloud cover, at 0.49 m per pixel",
    "recorded on 3 March 2016 in UTM zone 13N",
    "a parking lot with 56 cars",            # above 10: not a RemoteCount range
    "many small vehicles and numerous ships",
    "a field 2.5 km wide, 7% of it flooded",
    "a runway, 2,000 planes a year",
])
def test_numbers_that_are_not_counts(text):
    assert C.find_counts(text) == []


def test_swaps_inflect_the_head_noun_and_the_verb():
    def sw(text, new, digits=False):
        return C.swap(text, C.find_counts(text)[0], new, digits)

    assert sw("There is one ship in the centre of the image.", 3) == \
        "There are three ships in the centre of the image."
    assert sw("Eight ships are located in the centre.", 1) == "One ship is located in the centre."
    assert sw("1 storage tank is visible", 2) == "2 storage tanks are visible"
    assert sw("two storage tanks", 1, digits=True) == "1 storage tank"
    assert sw("one bus and a car", 4) == "four buses and a car"
    assert sw("three ferries", 1) == "one ferry"
    assert sw("There are 7 boxes in the image.", 1) == "There is 1 box in the image."
    assert sw("a harbor with 10 boats", 2) == "a harbor with 2 boats"


def test_bench_candidates_are_all_grammatical_for_multiword_categories():
    caps = P.counting_captions("an aerial image of a beach with 1 beach umbrella", 1)
    assert caps[0] == "an aerial image of a beach with 1 beach umbrella"
    assert caps[1] == "an aerial image of a beach with 2 beach umbrellas"
    assert all(c.endswith(f"{n} beach umbrellas") for n, c in zip(range(2, 11), caps[1:],
                                                                    strict=True))
    caps = P.counting_captions("There are four storage tanks in the image.", 4)
    assert caps[0] == "There is 1 storage tank in the image."
    assert caps[3] == "There are 4 storage tanks in the image."
    with pytest.raises(ValueError):
        P.swap_count("a satellite image of 3 planes", 4, 5)


def test_counterfactuals_change_one_count_to_every_other_value():
    text = "There is one car and two ships in the image."
    twins = {C.counterfactuals(text, random.Random(s))[0] for s in range(400)}
    assert C.counterfactuals(text, random.Random(5)) == C.counterfactuals(text, random.Random(5))
    assert text not in twins and len(twins) == 18  # 9 new values for each of the two counts
    assert "There are three cars and two ships in the image." in twins
    assert "There is one car and one ship in the image." in twins
    assert C.counterfactuals("a river through meadows", random.Random(0)) == []
    nine = C.counterfactuals("a harbor with 4 boats", random.Random(0), k=12)
    assert sorted(nine) == sorted(f"a harbor with {n} boat{'s' * (n > 1)}"
                                  for n in range(1, 11) if n != 4)


def test_count_loss_is_the_two_way_cross_entropy_and_ignores_unmarked_rows():
    from trainer.loss import count_loss, forward_counting

    g = torch.Generator().manual_seed(0)
    img, txt, cf = (torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
                    for _ in range(3))
    scale = torch.tensor(10.0)
    got = count_loss(img, txt, cf, scale)
    s1, s2 = (img * txt).sum(-1) * 10, (img * cf).sum(-1) * 10
    want = torch.mean(torch.log(torch.exp(s1) + torch.exp(s2)) - s1)
    assert math.isclose(float(got), float(want), rel_tol=1e-5)
    # the twin identical to the caption gives log 2; a caption far closer gives ~0
    assert math.isclose(float(count_loss(img, txt, txt, scale)), math.log(2), rel_tol=1e-5)
    assert float(count_loss(img, img, -img, scale)) < 1e-6
    # K twins: the (K+1)-way cross-entropy
    cf2 = torch.stack([cf, txt.flip(0)], dim=1)
    s3 = (img * txt.flip(0)).sum(-1) * 10
    want = torch.mean(torch.log(torch.exp(s1) + torch.exp(s2) + torch.exp(s3)) - s1)
    assert math.isclose(float(count_loss(img, txt, cf2, scale)), float(want), rel_tol=1e-5)

    calls = []

    def fwd(image, text):  # a stub model: features are the inputs, normalised
        calls.append(text.shape[0])
        f = torch.nn.functional.normalize
        return {"image_features": f(image, dim=-1), "text_features": f(text, dim=-1),
                "logit_scale": scale}

    mask = torch.tensor([True, False, True, False])
    out, loss = forward_counting(fwd, img, txt, cf2, mask)
    assert calls == [8] and out["text_features"].shape == (4, 8)
    assert torch.allclose(out["text_features"], txt, atol=1e-6)
    assert math.isclose(float(loss), float(count_loss(img[mask], txt[mask], cf2[mask], scale)),
                        rel_tol=1e-5)
    out, loss = forward_counting(fwd, img, txt, cf2, torch.zeros(4, dtype=torch.bool))
    assert loss is None and calls[-1] == 4


def test_twins_report_their_counts_and_draw_as_counterfactuals_does():
    text = "a harbor with 4 boats and one bridge"
    for s in range(20):
        true, twins = C.counterfactual_twins(text, random.Random(s), k=3)
        assert [t for t, _ in twins] == C.counterfactuals(text, random.Random(s), k=3)
        for t, v in twins:  # the value is the count the twin states where the true one was
            assert v != true and [c.value for c in C.find_counts(t)] != \
                [c.value for c in C.find_counts(text)]
            assert str(v) in t or C.NUMBER_WORDS[v] in t
    assert C.counterfactual_twins("a river through meadows", random.Random(0)) == (0, [])


def test_soft_targets_are_one_hot_at_zero_and_ordinal_above():
    assert C.soft_targets(4, [7, 3, 1], 0.0) == [1.0, 0.0, 0.0, 0.0]
    q = C.soft_targets(4, [7, 3, 1, 5], 0.25)
    assert math.isclose(sum(q), 1.0) and q[0] == max(q)
    assert q[4] > q[2] > q[1] > q[3]  # 5 (x1.25) nearer 4 than 3 (x0.75), 7, then 1
    # in ratio: 9 for a true 10 is a nearer miss than 1 for a true 2
    assert C.soft_targets(10, [9], 0.25)[1] > C.soft_targets(2, [1], 0.25)[1]


def test_count_loss_with_a_soft_target_is_the_soft_cross_entropy():
    from trainer.loss import count_loss

    g = torch.Generator().manual_seed(1)
    img, txt = (torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
                for _ in range(2))
    cf = torch.nn.functional.normalize(torch.randn(3, 2, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    q = torch.tensor([C.soft_targets(4, [5, 1], 0.3)] * 3)
    logits = 10 * torch.cat([(img * txt).sum(-1, keepdim=True),
                             torch.einsum("nd,nkd->nk", img, cf)], dim=1)
    want = -(q * torch.log_softmax(logits, dim=1)).sum(1).mean()
    assert math.isclose(float(count_loss(img, txt, cf, scale, q)), float(want), rel_tol=1e-5)
    one_hot = torch.tensor([[1.0, 0.0, 0.0]] * 3)
    assert math.isclose(float(count_loss(img, txt, cf, scale, one_hot)),
                        float(count_loss(img, txt, cf, scale)), rel_tol=1e-6)
