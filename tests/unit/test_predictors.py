"""The predictors: the built-in transformer (shapes, padding, readout, query tokens, limits), the
registry and its errors, and length-grouped execution."""

from __future__ import annotations

import pytest
import torch

from vljepa.config import ConfigError, PredictorConfig
from vljepa.models.grouping import length_groups, prefix_lengths, run_grouped
from vljepa.models.layers import SwiGLU
from vljepa.models.predictors import PREDICTORS, build_predictor
from vljepa.models.predictors.transformer import TransformerPredictor


def _predictor(**kw) -> TransformerPredictor:
    torch.manual_seed(0)
    args = dict(visual_dim=8, dim=16, depth=2, heads=2, target_dim=4, vocab_size=50, max_query_len=6,
                max_visual_tokens=5)
    return TransformerPredictor(**{**args, **kw}).eval()


def test_predictor_shapes_with_and_without_query():
    p = _predictor()
    v = torch.randn(3, 5, 8)
    assert p(v).shape == (3, 4)
    ids = torch.randint(1, 50, (3, 4))
    out = p(v, ids, torch.ones(3, 4, dtype=torch.long))
    assert out.shape == (3, 4)
    assert (out - p(v)).abs().max() > 1e-2  # the query is read
    torch.testing.assert_close(p(v, ids), out)  # no mask = every query token is real


def test_predictor_padding_invariance():
    p = _predictor()
    v = torch.randn(2, 5, 8)
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = p(v, ids, mask)
    # Three more padded positions holding arbitrary ids change nothing.
    ids_long = torch.cat([ids, torch.tensor([[11, 12, 13], [14, 15, 16]])], dim=1)
    mask_long = torch.cat([mask, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    torch.testing.assert_close(p(v, ids_long, mask_long), out, atol=1e-6, rtol=1e-5)
    # A row of the batch gives the same answer alone, unpadded.
    torch.testing.assert_close(p(v[1:], ids[1:, :2], mask[1:, :2]), out[1:], atol=1e-6, rtol=1e-5)
    # A fully padded query is the query-free prediction (caption rows in a mixed batch).
    torch.testing.assert_close(p(v, ids, torch.zeros_like(mask)), p(v), atol=1e-6, rtol=1e-5)


def test_query_readout_reads_query_tokens_and_query_free_rows_off_the_image():
    p = _predictor(pool="query")
    v = torch.randn(3, 5, 8)
    ids = torch.randint(1, 50, (3, 4))
    mask = torch.ones(3, 4, dtype=torch.long)
    mask[1] = 0  # a caption row of a mixed batch
    out = p(v, ids, mask)
    torch.testing.assert_close(out[1], p(v[1:2])[0], atol=1e-6, rtol=1e-5)
    # The readout mask: the query tokens of rows with a query, the image tokens of rows without.
    full = torch.cat([torch.ones(3, 5, dtype=torch.long), mask], 1).bool()
    read = p.readout_mask(full, 5)
    assert read[0].tolist() == [False] * 5 + [True] * 4
    assert read[1].tolist() == [True] * 5 + [False] * 4
    # Same weights, readout over all tokens: another prediction for rows with a query.
    p_all = _predictor(pool="all")
    p_all.load_state_dict(p.state_dict())
    assert (p_all(v, ids, mask)[0] - out[0]).abs().max() > 1e-3


def test_swiglu_blocks_and_an_unknown_mlp():
    p = _predictor(mlp="swiglu")
    assert all(isinstance(b.mlp, SwiGLU) for b in p.blocks)
    assert p(torch.randn(1, 5, 8), torch.ones(1, 3, dtype=torch.long)).shape == (1, 4)
    with pytest.raises(ConfigError, match="unknown model.predictor.mlp 'relu'"):
        _predictor(mlp="relu")


def test_video_tokens_get_each_frames_grid_and_the_frame_index():
    """Tokens of T frames: the same 2-D grid in every frame, and one time offset per frame."""
    from vljepa.models.layers import grid_position_encoding, visual_position_encoding

    torch.testing.assert_close(visual_position_encoding(16, 1, 8), grid_position_encoding(16, 8))
    enc = visual_position_encoding(8, 2, 8)  # 2 frames of 2x2 tokens
    shift = enc[4:] - enc[:4]
    torch.testing.assert_close(shift, shift[:1].expand(4, -1))  # the grid repeats, the time term is per frame
    assert shift.abs().max() > 0.1
    assert visual_position_encoding(8, 3, 8) is None and visual_position_encoding(12, 2, 8) is None
    p, q = _predictor(max_visual_tokens=8), _predictor(max_visual_tokens=8, frames=2)
    v = torch.randn(1, 8, 8)
    assert (p.embed_visual(v) - q.embed_visual(v)).abs().max() > 0.1  # as one 8-token grid it would not be square


def test_text_query_tokens_read_the_given_states():
    """query_tokens=text: the query tokens are a trained linear map of given Y token states."""
    p = _predictor(query_tokens="text", text_hidden_size=12)
    assert p.reads_query_states and not hasattr(p, "query_embed")
    v, ids = torch.randn(2, 5, 8), torch.randint(1, 50, (2, 3))
    states = torch.randn(2, 3, 12)
    out = p(v, ids, None, states)
    assert (p(v, ids, None, torch.randn(2, 3, 12)) - out).abs().max() > 1e-3  # the states are read
    torch.testing.assert_close(p(v, torch.randint(1, 50, (2, 3)), None, states), out)  # the ids are not
    with pytest.raises(ValueError, match="needs query_states"):
        p(v, ids)
    with pytest.raises(ConfigError, match="does not expose"):
        _predictor(query_tokens="text")


def test_predictor_limits_and_errors():
    p = _predictor()
    with pytest.raises(ConfigError, match="query of 7 tokens exceeds model.predictor.max_query_len=6"):
        p(torch.randn(1, 5, 8), torch.ones(1, 7, dtype=torch.long))
    with pytest.raises(ConfigError, match="6 visual tokens exceed model.predictor.max_visual_tokens=5"):
        p(torch.randn(1, 6, 8))
    with pytest.raises(ConfigError, match="width 16 is not divisible by heads 3"):
        _predictor(heads=3)
    with pytest.raises(ConfigError, match="unknown model.predictor.query_tokens 'words'"):
        _predictor(query_tokens="words")
    common = dict(visual_dim=8, num_visual_tokens=5, target_dim=4, text_vocab_size=50)
    with pytest.raises(ConfigError, match=r"unknown model.predictor.kind 'lstm'; choose one of \['hf_lm', 'transformer'\]"):
        build_predictor(PredictorConfig(kind="lstm"), **common)
    with pytest.raises(ConfigError, match="gives 300 tokens per sample; set model.predictor.max_visual_tokens >= 300"):
        build_predictor(PredictorConfig(), **{**common, "num_visual_tokens": 300})
    # A key the kind does not read is an error naming it, not silently ignored.
    with pytest.raises(ConfigError, match="model.predictor.num_layers=4 is not used by model.predictor.kind=transformer"):
        build_predictor(PredictorConfig(num_layers=4), **common)
    with pytest.raises(ConfigError, match="model.predictor.pool=query is not used by model.predictor.kind=hf_lm"):
        build_predictor(PredictorConfig(kind="hf_lm", path="x", pool="query"), **common)


def test_every_kind_declares_only_real_config_keys():
    keys = set(vars(PredictorConfig()))
    for kind in PREDICTORS.values():
        assert set(kind.config_keys) <= keys and "max_query_len" in kind.config_keys


def test_predictor_from_config_uses_every_field():
    cfg = PredictorConfig(dim=24, depth=3, heads=4, mlp_ratio=2.0, max_query_len=7, max_visual_tokens=9)
    p = build_predictor(cfg, visual_dim=10, num_visual_tokens=9, target_dim=5, text_vocab_size=30)
    assert len(p.blocks) == 3 and p.blocks[0].heads == 4
    assert p.blocks[0].mlp[0].out_features == 48
    assert p.query_pos.shape == (1, 7, 24) and p.visual_pos.shape == (1, 9, 24)
    assert p.query_embed.num_embeddings == 30 and p.head.out_features == 5


# ------------------------------------------------------------------------------------------ grouping


def test_length_groups_split_by_length_and_cover_every_row_once():
    lengths = torch.tensor([0] * 28 + [5, 6, 7, 8, 9] * 12 + [12, 13, 14] * 13)[torch.randperm(127)]
    groups = length_groups(lengths, base=16)
    assert 1 < len(groups) <= 4
    rows = torch.cat([r for r, _ in groups])
    assert sorted(rows.tolist()) == list(range(127))  # every row exactly once
    for r, longest in groups:
        assert int(lengths[r].max()) == longest
    assert groups[0][1] == 0  # the query-free rows are a group of their own
    padded = sum(len(r) * (16 + n) for r, n in groups)
    assert padded < 127 * (16 + 14) * 0.85
    # One length, or grouping turned off: a single group of all rows.
    assert len(length_groups(torch.full((9,), 4))) == 1
    assert len(length_groups(lengths, max_groups=1)) == 1
    assert prefix_lengths(torch.tensor([[1, 1, 0], [1, 0, 0]])).tolist() == [2, 1]
    assert prefix_lengths(torch.tensor([[0, 1, 1]])) is None  # left padding: not trimmed


def test_run_grouped_stitches_rows_back_in_order():
    lengths = torch.tensor([6, 1, 0, 6, 1, 3] * 20)
    mask = (torch.arange(6)[None] < lengths[:, None]).long()
    seen = []

    def run(rows, length):
        seen.append(length)
        return torch.arange(120)[rows] * 10 + length

    out = run_grouped(mask, run, max_groups=4)
    assert len(seen) > 1 and len(seen) == len(set(seen))
    assert (out // 10).tolist() == list(range(120))  # every row back in its place
    assert ((out % 10) >= lengths).all()  # each row ran padded to at least its own length


def test_grouped_predictions_and_gradients_equal_one_padded_block(make_tiny_config):
    """Query-free rows and queries of three lengths give the same predictions and gradients run in
    length groups as run as one padded block."""
    from vljepa.models.vljepa import VLJepa

    torch.manual_seed(0)
    m = VLJepa(make_tiny_config("hybrid", "model.predictor.pool=query")).train()
    v = torch.randn(40, 4, 32)
    lengths = torch.tensor([0] * 10 + [3] * 10 + [7] * 10 + [12] * 10)[torch.randperm(40)]
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    ids = torch.randint(1000, 2000, (40, 12)) * mask
    assert len(length_groups(lengths, base=4)) > 1
    outs = []
    for groups in (1, 4):
        m.max_length_groups = groups
        m.zero_grad()
        z = m.predict(visual_tokens=v, query_ids=ids, query_mask=mask)
        (z * torch.arange(16.0)).sum().backward()
        outs.append((z.detach(), {n: q.grad.clone() for n, q in m.predictor.named_parameters() if q.grad is not None}))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    assert outs[0][1].keys() == outs[1][1].keys()
    for name, g in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], g, atol=1e-4, rtol=1e-4, msg=name)


def test_hf_lm_built_from_an_architecture_file_is_float32():
    """Built without weights from a config that says bfloat16 (the shipped Llama-3.2-1B file), the LM's
    layers are float32 like the rest of the model; autocast decides the compute precision."""
    from vljepa.config import config_dir

    cfg = PredictorConfig(kind="hf_lm", path=str(config_dir() / "hf" / "meta-llama" / "Llama-3.2-1B"), num_layers=1)
    with torch.device("meta"):
        p = build_predictor(cfg, visual_dim=8, num_visual_tokens=4, target_dim=4, text_vocab_size=0,
                            load_weights=False, with_tokenizer=False)
    assert {t.dtype for t in p.parameters()} == {torch.float32}
