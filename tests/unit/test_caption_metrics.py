"""Captioning metrics on hand examples whose values are known."""

import numpy as np
import pytest

from vljepa.eval.caption import bleu4, caption_facts, caption_scores, cider_d, rouge_l, tokenize_caption

REFS = [
    ["a red cube left of a blue ball"],
    ["a green cone above a yellow cube"],
    ["two small purple spheres near the wall"],
]


def test_tokenize_lowercases_and_strips_punctuation():
    assert tokenize_caption("  A Red-cube, left of the BALL.  ") == "a red cube left of the ball"
    assert tokenize_caption("...") == ""


def test_identical_hypotheses_score_perfectly():
    scores = caption_scores(REFS, [r[0] for r in REFS])
    assert scores["cider"] == pytest.approx(10.0)
    assert scores["bleu4"] == pytest.approx(1.0)
    assert scores["rougeL"] == pytest.approx(1.0)


def test_punctuation_and_case_do_not_change_scores():
    hyps = [r[0].upper() + "." for r in REFS]
    assert caption_scores(REFS, hyps) == pytest.approx(caption_scores(REFS, [r[0] for r in REFS]))


def test_disjoint_hypotheses_score_zero():
    scores = caption_scores(REFS, ["zebra quantum violin orbit"] * 3)
    assert scores == {"cider": 0.0, "bleu4": 0.0, "rougeL": 0.0}


def test_cider_d_by_hand():
    # Corpus of 2 items: idf = log(2) - log(df). Item 0: unigram cosine 1/2 ("red" shared,
    # "ball" not), no shared bigram, no 3-/4-grams -> mean(0.5, 0, 0, 0) * 10 = 1.25.
    # Item 1: exact 2-word match -> mean(1, 1, 0, 0) * 10 = 5.0.
    corpus, per_item = cider_d([["red cube"], ["blue ball"]], ["red ball", "Blue ball."])
    np.testing.assert_allclose(per_item, [1.25, 5.0])
    assert corpus == pytest.approx(3.125)


def test_cider_d_averages_over_references():
    # Item 0 matches one of its two references exactly and shares nothing with the other.
    refs = [["a red cube left of a blue ball", "x"], ["a green cone above a yellow cube"]]
    _, per_item = cider_d(refs, [refs[0][0], refs[1][0]])
    np.testing.assert_allclose(per_item, [5.0, 10.0])


def test_bleu_and_rouge_use_every_reference():
    refs = [["zebra quantum violin orbit", "a red cube left of a blue ball"],
            ["a green cone above a yellow cube"]]
    hyps = ["a red cube left of a blue ball", "a green cone above a yellow cube"]
    assert bleu4(refs, hyps) == pytest.approx(1.0)
    assert rouge_l(refs, hyps) == pytest.approx(1.0)


def test_rouge_l_by_hand():
    # LCS("a red cube", "a blue cube") = 2 of 3 words each side: P = R = F = 2/3.
    assert rouge_l([["a red cube"]], ["a blue cube"]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("refs, hyps, match", [
    ([["a"], ["b"]], ["a"], "1 hypotheses for 2 reference lists"),
    ([], [], "no items to score"),
    ([["a"], []], ["a", "b"], r"references\[1\] is empty"),
    (["a cube"], ["a cube"], r"references\[0\] is a string"),
])
def test_bad_input_is_named(refs, hyps, match):
    with pytest.raises((ValueError, TypeError), match=match):
        caption_scores(refs, hyps)


def test_caption_facts_read_objects_left_to_right_in_any_paraphrase():
    left_to_right = ("large red circle", "small blue star")
    for text in ["A big red circle to the left of a little blue star.",
                 "a small blue star to the right of a large red circle",
                 "on the right a little blue star, on the left a big red circle",
                 "from right to left: a small blue star and a large red circle"]:
        assert caption_facts(text) == (left_to_right, None), text
    assert caption_facts("a small blue star to the left of a large red circle")[0] == left_to_right[::-1]
    assert caption_facts("a large green circle")[0] != caption_facts("a large red circle")[0]
    assert caption_facts("a big red circle to the left of a little blue star, and the blue star is above "
                         "the red circle") == (left_to_right, ("blue star", "red circle"))


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_every_world_paraphrase_of_a_scene_has_the_same_facts(count):
    from vljepa.data.world.captions import MAX_CAPTIONS, captions, vertical_pair
    from vljepa.data.world.scenes import SceneObject

    colours, shapes, sizes = ["red", "blue", "green", "orange", "purple"], ["circle", "star", "square"], ["small", "large"]
    # Left to right, the first object clearly above the others (two paraphrases then add a vertical clause).
    objects = [SceneObject(colours[i], shapes[i % 3], sizes[i % 2], x=0.1 + 0.8 * i / max(1, count - 1) if count > 1
                           else 0.5, y=0.2 if i == 0 else 0.8, r=0.05) for i in range(count)]
    expected = tuple(f"{o.size} {o.color} {o.shape}" for o in objects)
    facts = {caption_facts(c) for c in captions(objects, MAX_CAPTIONS)}
    assert {f[0] for f in facts} == {expected}
    pair = vertical_pair(objects)
    assert {f[1] for f in facts} == ({None} if pair is None else {None, (pair[0].name, pair[1].name)})
