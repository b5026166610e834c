"""Evaluation metrics: retrieval, zero-shot classification, VQA exact match."""

import pytest
import torch
import torch.nn.functional as F

from vljepa.eval.classify import class_embeddings, classification_metrics
from vljepa.eval.retrieval import build_text_index, retrieval_metrics
from vljepa.eval.vqa import normalize_answer, vqa_metrics

# --------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------


def test_build_text_index_deduplicates_across_and_within_images():
    texts, image_to_texts = build_text_index([["a cube", "a ball"], ["a ball", "a ball"], ["x"]])
    assert texts == ["a cube", "a ball", "x"]
    assert image_to_texts == [[0, 1], [1], [2]]


def test_perfect_retrieval():
    emb = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    m = retrieval_metrics(emb, emb * 3.0, [[i] for i in range(5)])
    assert m == {
        "i2t_R@1": 1.0, "i2t_R@5": 1.0, "i2t_R@10": 1.0,
        "i2t_median_rank": 1.0, "i2t_mean_rank": 1.0,
        "t2i_R@1": 1.0, "t2i_R@5": 1.0, "t2i_R@10": 1.0,
        "t2i_median_rank": 1.0, "t2i_mean_rank": 1.0,
        "n_images": 5, "n_texts": 5,
    }  # fmt: skip


def test_retrieval_ranks_on_a_hand_built_case():
    # Texts are one-hot, so row i of image_emb *is* image i's similarity to each text. Every row
    # is a permutation of the same values, so normalising keeps columns comparable.
    a, b, c, d = 0.7, 0.5, 0.4, 0.3
    image_emb = torch.tensor(
        [
            [a, b, c, d],  # correct text 0 scores a: rank 1     | text0 column a,b,c,b: rank 1
            [b, d, c, a],  # correct text 1 scores d: rank 4     | text1 column b,d,a,a: rank 4
            [c, a, b, d],  # correct text 2 scores b: rank 2     | text2 column c,c,b,d: rank 1
            [b, a, d, c],  # correct text 3 scores c: rank 3     | text3 column d,a,d,c: rank 2
        ]
    )
    m = retrieval_metrics(image_emb, torch.eye(4), [[0], [1], [2], [3]], ks=(1, 2, 5))
    # i2t ranks [1, 4, 2, 3]; t2i ranks [1, 4, 1, 2]
    assert m["i2t_R@1"] == 0.25
    assert m["i2t_R@2"] == 0.5
    assert m["i2t_R@5"] == 1.0
    assert m["i2t_median_rank"] == 2.5
    assert m["i2t_mean_rank"] == 2.5
    assert m["t2i_R@1"] == 0.5
    assert m["t2i_R@2"] == 0.75
    assert m["t2i_R@5"] == 1.0
    assert m["t2i_median_rank"] == 1.5
    assert m["t2i_mean_rank"] == 2.0
    assert "i2t_R@10" not in m


def test_shared_caption_is_a_hit_for_both_images():
    texts, image_to_texts = build_text_index([["a red cube", "left"], ["a red cube"]])
    text_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # "a red cube", "left"
    image_emb = torch.tensor([[1.0, 0.2], [1.0, 0.0]])
    m = retrieval_metrics(image_emb, text_emb, image_to_texts)
    # Both images retrieve "a red cube" first, and it is a ground truth of both.
    assert m["i2t_R@1"] == 1.0
    # "a red cube": image 1 scores highest (1.0 vs 0.98); counting only image 0 as its owner
    # would give rank 2. "left": only image 0 has it, and it scores higher than image 1.
    assert m["t2i_R@1"] == 1.0
    assert (m["n_images"], m["n_texts"]) == (2, 2)


def test_ties_count_against_the_model():
    # A collapsed model (every embedding equal) must not get credit for ties.
    m = retrieval_metrics(torch.ones(3, 4), torch.ones(3, 4), [[0], [1], [2]])
    assert m["i2t_R@1"] == 0.0
    assert m["i2t_mean_rank"] == 3.0
    assert m["t2i_median_rank"] == 3.0


def test_retrieval_matches_brute_force_reference_with_chunking():
    gen = torch.Generator().manual_seed(0)
    n_img, n_txt = 13, 20
    image_emb, text_emb = torch.randn(n_img, 6, generator=gen), torch.randn(n_txt, 6, generator=gen)
    # Each image owns texts i and i+13 (when they exist); text 5 is also shared by image 0.
    image_to_texts = [[i] + ([i + n_img] if i + n_img < n_txt else []) for i in range(n_img)]
    image_to_texts[0].append(5)

    m = retrieval_metrics(image_emb, text_emb, image_to_texts, batch_size=4)

    sims = F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    i2t = [
        1 + next(r for r, t in enumerate(sims[i].argsort(descending=True).tolist()) if t in hits)
        for i, hits in enumerate(image_to_texts)
    ]
    owners = [{i for i, hits in enumerate(image_to_texts) if t in hits} for t in range(n_txt)]
    t2i = [
        1 + next(r for r, i in enumerate(sims[:, t].argsort(descending=True).tolist()) if i in own)
        for t, own in enumerate(owners)
    ]
    for name, ranks in (("i2t", torch.tensor(i2t)), ("t2i", torch.tensor(t2i))):
        for k in (1, 5, 10):
            assert m[f"{name}_R@{k}"] == pytest.approx((ranks <= k).double().mean().item())
        assert m[f"{name}_mean_rank"] == pytest.approx(ranks.double().mean().item())
        assert m[f"{name}_median_rank"] == pytest.approx(ranks.double().quantile(0.5).item())


def test_retrieval_input_errors():
    emb = torch.eye(3)
    with pytest.raises(ValueError, match="image 1 has no ground-truth text"):
        retrieval_metrics(emb, emb, [[0], [], [2]])
    with pytest.raises(ValueError, match="text 2 is not a caption of any image"):
        retrieval_metrics(emb, emb, [[0], [1], [1]])
    with pytest.raises(ValueError, match="2 entries for 3 images"):
        retrieval_metrics(emb, emb, [[0], [1]])
    with pytest.raises(ValueError, match="width 3 but text_emb has 4"):
        retrieval_metrics(emb, torch.eye(4)[:3], [[0], [1], [2]])


# --------------------------------------------------------------------------------------------
# Zero-shot classification
# --------------------------------------------------------------------------------------------


def test_class_embeddings_average_normalised_template_embeddings():
    vectors = {
        "a photo of a cat.": [1.0, 0.0, 0.0],
        "a drawing of a cat.": [0.0, 4.0, 0.0],  # a large norm must not outweigh the other one
        "a photo of a dog.": [0.0, 0.0, 2.0],
        "a drawing of a dog.": [0.0, 0.0, 1.0],
    }
    grad_enabled = []

    def encode(prompts: list[str]) -> torch.Tensor:
        grad_enabled.append(torch.is_grad_enabled())
        return torch.tensor([vectors[p] for p in prompts])

    emb = class_embeddings(["cat", "dog"], ["a photo of a {}.", "a drawing of a {}."], encode)

    s = 2**-0.5
    torch.testing.assert_close(emb, torch.tensor([[s, s, 0.0], [0.0, 0.0, 1.0]]))
    assert grad_enabled == [False, False]


def test_class_embeddings_rejects_template_without_placeholder():
    with pytest.raises(ValueError, match="template 'a photo' has no"):
        class_embeddings(["cat"], ["a photo of a {}.", "a photo"], lambda p: torch.ones(len(p), 2))


def test_classification_top_k():
    class_emb = torch.eye(3)
    image_emb = torch.tensor(
        [
            [0.9, 0.3, 0.1],  # label 0: rank 1
            [0.9, 0.3, 0.1],  # label 1: rank 2
            [0.9, 0.3, 0.1],  # label 2: rank 3
            [0.1, 0.2, 0.8],  # label 2: rank 1
        ]
    )
    labels = [0, 1, 2, 2]
    m = classification_metrics(image_emb, class_emb, labels, ks=(1, 2, 5))
    assert m == {"top1": 0.5, "top2": 0.75, "top5": 1.0, "n": 4}  # top5 clipped to 3 classes

    m = classification_metrics(image_emb, class_emb, labels, classnames=["cat", "dog", "cow"])
    assert m["top1"] == 0.5 and m["top5"] == 1.0
    assert m["per_class_top1"] == {"cat": 1.0, "dog": 0.0, "cow": 0.5}


def test_classification_errors():
    with pytest.raises(ValueError, match="label 3 is outside"):
        classification_metrics(torch.eye(2), torch.eye(2), [0, 3])
    with pytest.raises(ValueError, match="1 labels for 2 images"):
        classification_metrics(torch.eye(2), torch.eye(2), [0])


# --------------------------------------------------------------------------------------------
# VQA
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Red", "red"),
        ("  two   cubes \n", "two cubes"),
        ("yes.", "yes"),
        ("blue !?", "blue"),
        ("The red cube.", "red cube"),
        ("an apple", "apple"),
        ("a", "a"),  # an article that is the whole answer stays
        ("theater", "theater"),  # only a whole leading word is an article
        ("3.5", "3.5"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_metrics_per_type():
    predictions = ["Red.", "blue", "3", "two", "the cube"]
    answers = [["red"], ["green", "teal"], ["three", "3"], ["2"], ["cube", "box"]]
    types = ["color", "color", "count", "count", "shape"]
    m = vqa_metrics(predictions, answers, types)
    assert m == {
        "accuracy": 3 / 5,
        "n": 5,
        "per_type": {
            "color": {"accuracy": 0.5, "n": 2},
            "count": {"accuracy": 0.5, "n": 2},
            "shape": {"accuracy": 1.0, "n": 1},
        },
    }


def test_vqa_metrics_errors():
    with pytest.raises(ValueError, match="got 2, 1 and 2"):
        vqa_metrics(["a", "b"], [["a"]], ["t", "t"])
    with pytest.raises(TypeError, match=r"wrap it as \['red'\]"):
        vqa_metrics(["r"], ["red"], ["color"])


def test_vqa_candidates_are_the_canonical_answers():
    from vljepa.data.formats import VQARecord
    from vljepa.eval.report import candidate_answers

    recs = [VQARecord("a.png", "how many stars?", "two", ("two", "2"), "count", 0),
            VQARecord("a.png", "is it red?", "yes", ("yes",), "yesno", 1),
            VQARecord("b.png", "how many circles?", "two", ("two", "2"), "count", 2)]
    assert candidate_answers(recs) == ["two", "yes"]
