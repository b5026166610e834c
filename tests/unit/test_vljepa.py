"""VLJepa: frozen parts, the training step and its loss terms, target de-duplication, query states,
and save / load."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from vljepa import hub
from vljepa.config import ConfigError
from vljepa.losses import info_nce
from vljepa.models.vljepa import VLJepa, VLJepaOutput


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _caption_batch(model, texts, pixels) -> dict[str, torch.Tensor]:
    tok = model.tokenize(texts)
    return {"pixel_values": pixels, "target_ids": tok["input_ids"], "target_mask": tok["attention_mask"]}


def test_frozen_parts_are_frozen_and_stay_in_eval_mode(tiny_model):
    m = tiny_model
    assert all(not p.requires_grad for p in m.vision.parameters())
    assert all(not p.requires_grad for p in m.text.parameters())
    assert all(p.requires_grad for p in m.predictor.parameters())
    assert all(p.requires_grad for p in m.target_head.parameters())
    assert m.criterion.logit_scale.requires_grad
    try:
        m.train()
        assert m.training and m.predictor.training and m.target_head.training
        assert not m.vision.training and not m.text.training
        assert not any(mod.training for mod in m.text.modules())
    finally:
        m.eval()


def test_parameter_summary_counts(tiny_model):
    s = tiny_model.parameter_summary()
    assert list(s) == ["vision", "predictor", "text", "target_head", "temperature"]
    assert s["temperature"] == {"trainable": 1, "frozen": 0}  # the learnable InfoNCE temperature

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert s["vision"] == {"trainable": 0, "frozen": count(tiny_model.vision)}
    assert s["text"] == {"trainable": 0, "frozen": count(tiny_model.text)}
    assert s["predictor"] == {"trainable": count(tiny_model.predictor), "frozen": 0}
    assert s["target_head"] == {"trainable": count(tiny_model.target_head), "frozen": 0}
    assert 22_000_000 < s["text"]["frozen"] < 23_000_000  # all-MiniLM-L6-v2


def test_forward_returns_named_terms_and_grads_only_on_trainable(tiny_model):
    m = copy.deepcopy(tiny_model).train()
    batch = _caption_batch(m, ["a red circle", "two blue stars", "a small green square"], _pixels(3))
    batch.update(m.tokenize_queries(["what color is it?", "how many?", ""]))
    out = m(batch)
    assert isinstance(out, VLJepaOutput)
    assert out.pred.shape == (3, 16) and out.target.shape == (3, 16)
    torch.testing.assert_close(out.pred.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.target.norm(dim=-1), torch.ones(3))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.metrics) == {"infonce_loss", "p2t", "t2p", "batch_acc", "temperature"}
    assert all(not v.requires_grad for v in out.metrics.values())
    torch.testing.assert_close(out.loss.detach(), out.metrics["infonce_loss"])
    assert float(out.metrics["temperature"]) == pytest.approx(0.07, rel=1e-4)
    out.loss.backward()
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert m.criterion.logit_scale.grad != 0
    assert m.predictor.head.weight.grad.abs().sum() > 0 and m.target_head.out.weight.grad.abs().sum() > 0


def test_regression_loss_kind_in_forward(tiny_model):
    m = copy.deepcopy(tiny_model)
    m.criterion.cfg = copy.deepcopy(m.criterion.cfg)
    m.criterion.cfg.kind = "cosine"
    with torch.no_grad():
        out = m(_caption_batch(m, ["a red circle", "a blue star"], _pixels(2)))
    torch.testing.assert_close(out.loss, (1 - (out.pred * out.target).sum(-1)).mean())
    assert set(out.metrics) == {"cosine_loss"}


def test_target_uniformity_is_a_weighted_term_of_the_loss(make_tiny_config):
    torch.manual_seed(0)
    m = VLJepa(make_tiny_config("hybrid", "model.loss.target_uniformity=0.5")).train()
    batch = {**_caption_batch(m, ["yes", "no", "yes"], _pixels(3)), "target_groups": torch.tensor([0, 1, 0])}
    out = m(batch)
    assert set(out.metrics) >= {"infonce_loss", "uniformity_loss"}
    torch.testing.assert_close(out.loss.detach(), out.metrics["infonce_loss"] + out.metrics["uniformity_loss"])
    from vljepa.losses import target_uniformity

    torch.testing.assert_close(out.metrics["uniformity_loss"], 0.5 * target_uniformity(out.target.detach(),
                                                                                       batch["target_groups"]))
    out.loss.backward()
    assert m.target_head.skip.weight.grad.abs().sum() > 0


def test_repeated_targets_are_embedded_once_and_match_separate_targets(tiny_model):
    m = tiny_model
    texts = ["yes", "red", "yes", "no", "red", "yes"]
    groups = torch.tensor([4, 2, 4, 7, 2, 4])
    pixels = _pixels(6, seed=1)
    batch = {**_caption_batch(m, texts, pixels), "target_groups": groups}
    batch.update(m.tokenize_queries(["is it red?", "what color?", "is it big?", "is it small?", "color?", "any?"]))
    rows = []
    hook = m.target_head.register_forward_hook(lambda mod, inp, out: rows.append(out.shape[0]))
    try:
        with torch.no_grad():
            out = m(batch)
    finally:
        hook.remove()
    assert sum(rows) == 3  # three distinct answers went through the head, not six
    with torch.no_grad():
        separate = torch.cat([m.encode_text([t]) for t in texts])
        pred = m.predict(pixels, query_ids=batch["query_ids"], query_mask=batch["query_mask"])
        scale = m.criterion.logit_scale.exp().clamp(max=m.config.loss.max_logit_scale)
        ref = info_nce(pred, separate, scale, groups)
    torch.testing.assert_close(out.target, separate, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.loss, ref["infonce_loss"], atol=1e-5, rtol=1e-4)


def test_cached_target_features_give_the_same_loss_as_target_ids(tiny_model):
    from vljepa.data.collate import TextTable
    from vljepa.embed import encode_text_features

    m = tiny_model
    texts = ["a red circle", "two big blue stars on the left", "yes"]
    pixels = _pixels(3, seed=2)
    feats = encode_text_features(m, texts, with_states=True, batch_size=2)
    assert feats["offsets"].tolist()[0] == 0 and feats["states"].shape[0] == feats["offsets"][-1]
    cached = TextTable(**feats).batch(torch.tensor([2, 0, 1]))
    live = _caption_batch(m, [texts[2], texts[0], texts[1]], pixels)
    with torch.no_grad():
        a = m({"pixel_values": pixels, **cached})
        b = m(live)
    torch.testing.assert_close(a.target, b.target, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-4)


def test_hybrid_target_head_adds_the_pooled_path(make_tiny_config):
    torch.manual_seed(0)
    m = VLJepa(make_tiny_config("hybrid")).train()
    assert m.target_head.reads_states and m.target_head.skip.in_features == m.text.pooled_size
    tok = m.tokenize(["yes", "no", "a red circle"])
    feats = m.text_features(tok["input_ids"], tok["attention_mask"])
    z = m.embed_target(**feats)
    with torch.no_grad():  # the pooled path is part of the output: zeroing it changes every embedding
        m.target_head.skip.weight.zero_()
        m.target_head.skip.bias.zero_()
    assert ((m.embed_target(**feats) - z).norm(dim=-1) > 1e-3).all()


def test_target_head_length_groups_change_nothing(make_tiny_config):
    """Answers (a few tokens) and captions in one batch: read in length groups, the same embeddings."""
    torch.manual_seed(0)
    m = VLJepa(make_tiny_config("hybrid")).train()
    texts = ["yes", "no", "two", "a red circle", "a small red circle to the left of a large blue square",
             "there is a big green star above a small yellow triangle and a red circle", "red"] * 10
    tok = m.tokenize(texts)
    feats = m.text_features(tok["input_ids"], tok["attention_mask"])
    calls = []
    hook = m.target_head.register_forward_hook(lambda mod, inp, out: calls.append(out.shape[0]))
    outs = []
    for groups in (1, 4):
        m.max_length_groups = groups
        outs.append(m.embed_target(**feats))
    hook.remove()
    assert calls[0] == len(texts) and len(calls) > 2  # one block, then several groups
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


def test_text_query_states_are_the_y_encoders_and_can_come_precomputed(make_tiny_config):
    """query_tokens=text: the predictor reads Y's token states of the query; states given in the batch
    (the training data path encodes each distinct query once) give the same prediction."""
    torch.manual_seed(0)
    m = VLJepa(make_tiny_config("hybrid", "model.predictor.query_tokens=text")).eval()
    pixels = _pixels(3)
    q = m.tokenize_queries(["is the circle red?", "", "is there a star?"])
    q["query_mask"][1] = 0  # row 1 is a caption, as the collator pads it in a mixed batch: no query token
    states = m.query_states(q["query_ids"], q["query_mask"])
    one = m.tokenize_queries(["is there a star?"])
    n = int(one["query_mask"].sum())
    with torch.no_grad():
        y = m.text(one["query_ids"], one["query_mask"]).states[0]
    torch.testing.assert_close(states[2, :n], y[:n], atol=1e-5, rtol=1e-5)
    assert states[2, n:].abs().sum() == 0 and states[1].abs().sum() == 0  # padding and the query-free row
    none = m.query_states(q["query_ids"], torch.zeros_like(q["query_mask"]))
    assert none.shape == states.shape and none.abs().sum() == 0
    first = m.predict(pixels, **q)
    torch.testing.assert_close(m.predict(pixels, **q, query_states=states), first)
    other = m.tokenize_queries(["is the circle blue?"] * 3)
    assert (m.predict(pixels, **other)[0] - first[0]).abs().max() > 1e-3  # the words matter
    m.train()
    m.predict(pixels, **q).sum().backward()
    assert m.predictor.query_in[1].weight.grad.abs().sum() > 0


def test_predict_needs_pixels_or_tokens(tiny_model):
    with pytest.raises(ValueError, match="predict needs pixel_values or visual_tokens"):
        tiny_model.predict()
    tokens = tiny_model.encode_image(_pixels(2))
    assert tokens.shape == (2, 4, 32)
    torch.testing.assert_close(tiny_model.predict(visual_tokens=tokens), tiny_model.predict(_pixels(2)))
    assert tiny_model.tokenize_queries(["", ""]) is None


# ------------------------------------------------------------------------------------------ save / load


@pytest.fixture(scope="module")
def saved_model(tiny_model, tmp_path_factory):
    return tiny_model.save_pretrained(tmp_path_factory.mktemp("saved") / "model")


def test_save_pretrained_then_from_pretrained_is_identical(tiny_model, saved_model):
    assert {p.name for p in saved_model.iterdir()} == {"config.json", "model.safetensors", "text_encoder", "README.md"}
    meta = json.loads((saved_model / "config.json").read_text())
    assert meta["format"] == "vljepa" and meta["format_version"] == hub.FORMAT_VERSION
    assert meta["model"]["target_head"] == "token"
    loaded = VLJepa.from_pretrained(saved_model)
    assert not loaded.training and loaded.config == tiny_model.config
    pixels = _pixels(3, seed=3)
    q = tiny_model.tokenize_queries(["what color is the star?", "", "how many?"])
    texts = ["a red circle", "yes", "three small squares from left to right"]
    with torch.no_grad():
        assert torch.equal(loaded.predict(pixels, **q), tiny_model.predict(pixels, **q))
        torch.testing.assert_close(loaded.encode_text(texts), tiny_model.encode_text(texts), atol=1e-6, rtol=1e-5)
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert "| predictor |" in (saved_model / "README.md").read_text()


def test_from_pretrained_on_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ConfigError, match=r"is not a vljepa model folder: no config\.json \(expected config\.json "
                                          r"\(format=vljepa\), model\.safetensors and text_encoder/\)"):
        VLJepa.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ConfigError, match="config.json lacks format=vljepa"):
        VLJepa.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_bytes(b"{not json \xff")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        VLJepa.from_pretrained(tmp_path)
    meta = {"format": "vljepa", "format_version": hub.FORMAT_VERSION, "model": {}}
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="has config.json but no model.safetensors"):
        VLJepa.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ConfigError, match=r"written by a newer vljepa \(format 99\); upgrade vljepa"):
        VLJepa.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(ConfigError, match=r"written by an older vljepa \(format 1"):
        VLJepa.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"model '.*nowhere' not found: give a folder written by save_pretrained"):
        VLJepa.from_pretrained(tmp_path / "nowhere")


def test_weights_that_are_not_safetensors_or_do_not_fit_are_named(tiny_model, saved_model, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    (folder / "model.safetensors").write_bytes(b"\x80\x04 a pickle, not safetensors")
    with pytest.raises(ConfigError, match="cannot read model.safetensors"):
        VLJepa.from_pretrained(folder)
    other = copy.deepcopy(tiny_model.config)
    other.embed_dim = 8
    with pytest.raises(ConfigError, match=r"train.init_from='.*' does not fit this model config"):
        hub.load_weights_into(VLJepa(other, load_weights=False), saved_model, what="train.init_from")


def test_save_pretrained_replaces_an_existing_folder_atomically(tiny_model, saved_model, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    (folder / "stale.txt").write_text("from an older save")
    m = copy.deepcopy(tiny_model)
    with torch.no_grad():
        m.predictor.head.bias.fill_(0.25)
    assert m.save_pretrained(folder) == folder
    assert not (folder / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or old folders left
    assert torch.all(load_file(str(folder / "model.safetensors"))["predictor.head.bias"] == 0.25)

    # A save that fails half-way leaves the previous model untouched and no temporary folder.
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    def broken_card(model):
        raise RuntimeError("disk full")

    monkeypatch.setattr(hub, "model_card", broken_card)
    with torch.no_grad():
        m.predictor.head.bias.fill_(-1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        m.save_pretrained(folder)
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
