"""CandidateBank: building, nearest-neighbour search, decoding, save / load."""

import json

import pytest
import torch

from vljepa.decode.nearest import EMBEDDINGS_FILE, TEXTS_FILE, CandidateBank


def _one_hot_bank() -> CandidateBank:
    # Rows of different norms: the bank must normalise them, so scores are cosines.
    emb = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 3.0]])
    return CandidateBank(["red", "green", "blue"], emb)


def test_build_deduplicates_in_first_seen_order_and_batches_under_no_grad():
    calls = []

    def encode(texts: list[str]) -> torch.Tensor:
        calls.append((list(texts), torch.is_grad_enabled()))
        vocab = {"b": [3.0, 4.0], "a": [1.0, 0.0], "c": [0.0, -2.0]}
        return torch.tensor([vocab[t] for t in texts], dtype=torch.float64)

    bank = CandidateBank.build(["b", "a", "b", "c", "a"], encode, batch_size=2)

    assert bank.texts == ["b", "a", "c"]
    assert len(bank) == 3
    assert calls == [(["b", "a"], False), (["c"], False)]
    assert bank.embeddings.dtype == torch.float32
    expected = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, -1.0]])
    torch.testing.assert_close(bank.embeddings, expected)


def test_build_rejects_encoder_with_wrong_output_shape():
    with pytest.raises(ValueError, match=r"encode returned \(1, 4\) for 2 texts"):
        CandidateBank.build(["x", "y"], lambda texts: torch.ones(1, 4))


def test_search_returns_nearest_by_cosine():
    bank = _one_hot_bank()
    queries = torch.tensor([[0.0, 0.0, 0.1], [5.0, 1.0, 0.0], [0.1, 1.0, 0.9]])

    scores, indices = bank.search(queries, k=2)

    assert indices.tolist() == [[2, 0], [0, 1], [1, 2]]
    q = torch.nn.functional.normalize(queries, dim=-1)
    torch.testing.assert_close(scores, torch.stack([q[0, [2, 0]], q[1, [0, 1]], q[2, [1, 2]]]))
    assert bank.decode(queries) == [["blue"], ["red"], ["green"]]


def test_search_clips_k_to_bank_size_best_first():
    bank = _one_hot_bank()
    scores, indices = bank.search(torch.tensor([[0.2, 0.3, 1.0]]), k=10)

    assert indices.tolist() == [[2, 1, 0]]
    assert scores.shape == (1, 3)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())
    assert bank.decode(torch.tensor([[0.2, 0.3, 1.0]]), k=10) == [["blue", "green", "red"]]


def test_chunked_search_matches_unchunked():
    gen = torch.Generator().manual_seed(0)
    bank = CandidateBank([f"t{i}" for i in range(50)], torch.randn(50, 8, generator=gen))
    queries = torch.randn(7, 8, generator=gen)

    full_s, full_i = bank.search(queries, k=5, batch_size=4096)
    # batch_size 3 -> 3 query rows and 3 bank rows per block: many blocks, running top-k merges.
    chunk_s, chunk_i = bank.search(queries, k=5, batch_size=3)

    assert torch.equal(chunk_i, full_i)
    torch.testing.assert_close(chunk_s, full_s)
    reference = torch.nn.functional.normalize(queries, dim=-1) @ bank.embeddings.T
    assert torch.equal(full_i, reference.topk(5, dim=1).indices)


def test_search_validates_queries():
    bank = _one_hot_bank()
    with pytest.raises(ValueError, match=r"queries\[None\]"):
        bank.search(torch.ones(3))
    with pytest.raises(ValueError, match=r"must be \[B, 3\]"):
        bank.search(torch.ones(2, 4))
    with pytest.raises(ValueError, match="k must be >= 1"):
        bank.search(torch.ones(1, 3), k=0)


def test_index_and_missing_text():
    bank = _one_hot_bank()
    assert bank.index("green") == 1
    with pytest.raises(KeyError, match="'purple' is not in the candidate bank"):
        bank.index("purple")


def test_constructor_validation():
    with pytest.raises(ValueError, match="2 texts but 3 embedding rows"):
        CandidateBank(["a", "b"], torch.ones(3, 4))
    with pytest.raises(ValueError, match="duplicate candidate text 'a'"):
        CandidateBank(["a", "b", "a"], torch.randn(3, 4))
    with pytest.raises(ValueError, match="2-D"):
        CandidateBank(["a"], torch.ones(4))
    with pytest.raises(ValueError, match=r"'b' \(row 1\) contains NaN"):
        CandidateBank(["a", "b"], torch.tensor([[1.0, 0.0], [float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="all-zero embedding"):
        CandidateBank(["a", "b"], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_save_load_round_trip_is_identical(tmp_path):
    gen = torch.Generator().manual_seed(1)
    texts = ["a red cube", "ünïcødé ball", "the \"quoted\" one", "x"]
    bank = CandidateBank(texts, torch.randn(4, 6, generator=gen))
    folder = tmp_path / "bank"

    bank.save(folder)
    loaded = CandidateBank.load(folder)

    assert sorted(p.name for p in folder.iterdir()) == sorted([EMBEDDINGS_FILE, TEXTS_FILE])
    assert loaded.texts == texts
    assert torch.equal(loaded.embeddings, bank.embeddings)
    queries = torch.randn(3, 6, generator=gen)
    assert loaded.decode(queries, k=2) == bank.decode(queries, k=2)


def test_save_overwrites_an_existing_bank(tmp_path):
    _one_hot_bank().save(tmp_path)
    CandidateBank(["only"], torch.ones(1, 2)).save(tmp_path)
    assert CandidateBank.load(tmp_path).texts == ["only"]


def test_load_of_a_folder_that_is_not_a_bank(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match=r"is not a candidate bank: missing embeddings"):
        CandidateBank.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a candidate bank"):
        CandidateBank.load(tmp_path / "does-not-exist")


def test_load_detects_files_from_different_saves(tmp_path):
    bank = _one_hot_bank()
    bank.save(tmp_path)
    # Same length, different texts: a silent mis-pairing that only the stored hash can catch.
    (tmp_path / TEXTS_FILE).write_text(json.dumps(["r", "g", "b"]), encoding="utf-8")
    with pytest.raises(ValueError, match="come from different saves"):
        CandidateBank.load(tmp_path)
