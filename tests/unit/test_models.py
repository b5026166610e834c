"""Models: the predictor, the real pretrained towers (EfficientNet-Lite0, all-MiniLM-L6-v2), and
VLJepa's frozen parts, training step, target de-duplication and save / load."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vljepa.config import ConfigError, PredictorConfig, TextConfig, VisionConfig
from vljepa.losses import info_nce
from vljepa.models import vljepa as vljepa_module
from vljepa.models.predictor import (PointerGeometry, Predictor, build_predictor, grid_coordinates, length_buckets,
                                     prefix_lengths)
from vljepa.models.text import build_text_encoder, read_pooling, resolve_text_path
from vljepa.models.vision import build_vision_encoder, efficientnet_lite0_state_dict
from vljepa.models.vljepa import VLJepa, VLJepaOutput

# ------------------------------------------------------------------------------------------ predictor


def _predictor(**kw) -> Predictor:
    torch.manual_seed(0)
    args = dict(visual_dim=8, dim=16, depth=2, heads=2, target_dim=4, vocab_size=50, max_query_len=6,
                max_visual_tokens=5)
    return Predictor(**{**args, **kw}).eval()


def test_predictor_shapes_with_and_without_query():
    p = _predictor()
    v = torch.randn(3, 5, 8)
    assert p(v).shape == (3, 4)
    ids = torch.randint(1, 50, (3, 4))
    out = p(v, ids, torch.ones(3, 4, dtype=torch.long))
    assert out.shape == (3, 4)
    assert not torch.allclose(out, p(v))  # the query is read
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


def test_length_buckets_split_by_length_and_cover_every_row_once():
    lengths = torch.tensor([0] * 28 + [5, 6, 7, 8, 9] * 12 + [12, 13, 14] * 13)[torch.randperm(127)]
    groups = length_buckets(lengths, base=16)
    assert 1 < len(groups) <= 4
    rows = torch.cat([r for r, _ in groups])
    assert sorted(rows.tolist()) == list(range(127))  # every row exactly once
    for r, longest in groups:
        assert int(lengths[r].max()) == longest
    assert groups[0][1] == 0  # the query-free rows are a group of their own
    padded = sum(len(r) * (16 + n) for r, n in groups)
    assert padded < 127 * (16 + 14) * 0.85
    # One length, or buckets turned off: a single group of all rows.
    assert len(length_buckets(torch.full((9,), 4))) == 1
    assert len(length_buckets(lengths, max_buckets=1)) == 1
    assert prefix_lengths(torch.tensor([[1, 1, 0], [1, 0, 0]])).tolist() == [2, 1]
    assert prefix_lengths(torch.tensor([[0, 1, 1]])) is None  # left padding: not trimmed


@pytest.mark.parametrize("fusion", ["none", "match", "pointer"])
def test_predictor_length_buckets_change_nothing(fusion):
    """A batch of query-free rows and queries of three lengths gives the same outputs and gradients
    run in length groups as run as one padded batch."""
    p = _predictor(registers=2, fusion=fusion, max_query_len=12, max_visual_tokens=16).train()
    v = torch.randn(40, 16, 8)
    lengths = torch.tensor([0] * 10 + [3] * 10 + [7] * 10 + [12] * 10)[torch.randperm(40)]
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    ids = torch.randint(1, 50, (40, 12)) * mask
    assert len(length_buckets(lengths, base=18, max_buckets=p.max_length_buckets)) > 1
    outs = []
    for buckets in (1, 4):
        p.max_length_buckets = buckets
        p.zero_grad()
        z = p(v, ids, mask)
        (z * torch.arange(4.0)).sum().backward()
        outs.append((z.detach(), {n: q.grad.clone() for n, q in p.named_parameters() if q.grad is not None}))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    assert outs[0][1].keys() == outs[1][1].keys()
    for name, g in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], g, atol=1e-4, rtol=1e-4, msg=name)


def test_grid_coordinates():
    xy = grid_coordinates(9)
    assert xy.tolist()[:4] == [[-1.0, -1.0], [0.0, -1.0], [1.0, -1.0], [-1.0, 0.0]]  # raster order, x first
    assert grid_coordinates(8) is None


def _two_object_scenes(n: int, generator: torch.Generator):
    """Tokens of a 4x4 grid holding two objects (one-hot kinds 0-3), the words of "is the <kind a>
    <left|right> of the <kind b>?" (kind, relation word, kind, each plus a fixed position vector),
    and the answer (1 = yes); rows whose objects share a column are marked -100."""
    dim, coords = 16, grid_coordinates(16)
    position = torch.randn(3, dim, generator=torch.Generator().manual_seed(1)) * 0.5  # the same in every batch
    kinds = torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(n)])
    cells = torch.stack([torch.randperm(16, generator=generator)[:2] for _ in range(n)])
    rows = torch.arange(n)
    tokens = torch.zeros(n, 16, dim)
    tokens[rows, cells[:, 0], kinds[:, 0]] = 1
    tokens[rows, cells[:, 1], kinds[:, 1]] = 1
    left = torch.randint(0, 2, (n,), generator=generator)
    words = position.expand(n, 3, dim).clone()
    words[rows, 0, kinds[:, 0]] += 1
    words[rows, 1, 4 + left] += 1
    words[rows, 2, kinds[:, 1]] += 1
    xa, xb = coords[cells[:, 0], 0], coords[cells[:, 1], 0]
    answer = ((xa < xb) == left.bool()).long()
    answer[xa == xb] = -100
    return tokens, words, answer


def test_pointer_geometry_learns_which_named_thing_is_left_of_the_other():
    """The relation the transformer alone did not learn on the built-in world, in its smallest form:
    each word's role (first or second thing named) and the relation word only add to its vector, so a
    per-word sign is an XOR; the ordered pointer offsets make it a product of two projections."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    pointer, readout = PointerGeometry(dim=16, pointers=2, rank=8), torch.nn.Linear(16, 2)
    opt = torch.optim.Adam([*pointer.parameters(), *readout.parameters()], lr=3e-3)
    coords, mask = grid_coordinates(16), torch.ones(64, 3)
    for _ in range(200):
        tokens, words, answer = _two_object_scenes(64, g)
        loss = F.cross_entropy(readout(pointer(tokens, coords, words, mask)), answer, ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    tokens, words, answer = _two_object_scenes(1000, g)
    with torch.no_grad():
        guess = readout(pointer(tokens, coords, words, torch.ones(1000, 3))).argmax(1)
    keep = answer >= 0
    assert (guess[keep] == answer[keep]).float().mean() > 0.95


def test_predictor_pointer_branch():
    """fusion=pointer adds the ordered pointer offsets to the pooled state of rows with a query only;
    a grid that is not square is an error naming the option."""
    plain = _predictor(max_visual_tokens=16, max_query_len=12)
    p = _predictor(max_visual_tokens=16, max_query_len=12, fusion="pointer", pointers=3)
    assert p.pointer.weight.out_features == 3 and p.pointer.query.out_features == 3 * 4  # rank dim // 4
    missing, unexpected = plain.load_state_dict(p.state_dict(), strict=False)
    assert not missing and all(k.startswith("pointer.") for k in unexpected)
    v = torch.randn(3, 16, 8)
    ids = torch.randint(1, 50, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1] = 0  # a caption row of a mixed batch
    out = p(v, ids, mask)
    torch.testing.assert_close(out[1], plain(v, ids, mask)[1])
    assert not torch.allclose(out[0], plain(v, ids, mask)[0])
    torch.testing.assert_close(p(v), plain(v))
    p.train()
    p(v, ids, mask).sum().backward()
    for name, param in p.pointer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    with pytest.raises(ConfigError, match="fusion=pointer needs a square grid"):
        p(torch.randn(1, 15, 8), ids[:1], mask[:1])
    with pytest.raises(ConfigError, match="model.predictor.pointers=0 must be >= 1"):
        _predictor(fusion="pointer", pointers=0)


def test_predictor_limits_and_errors():
    p = _predictor()
    with pytest.raises(ConfigError, match="query of 7 tokens exceeds model.predictor.max_query_len=6"):
        p(torch.randn(1, 5, 8), torch.ones(1, 7, dtype=torch.long))
    with pytest.raises(ConfigError, match="6 visual tokens exceed model.predictor.max_visual_tokens=5"):
        p(torch.randn(1, 6, 8))
    with pytest.raises(ConfigError, match="predictor dim 16 is not divisible by heads 3"):
        _predictor(heads=3)
    with pytest.raises(ConfigError, match=r"unknown model.predictor.kind 'lstm'; choose one of \['transformer'\]"):
        build_predictor(PredictorConfig(kind="lstm"), visual_dim=8, target_dim=4, vocab_size=50)


def test_predictor_from_config_uses_every_field():
    cfg = PredictorConfig(dim=24, depth=3, heads=4, mlp_ratio=2.0, max_query_len=7, max_visual_tokens=9)
    p = build_predictor(cfg, visual_dim=10, target_dim=5, vocab_size=30)
    assert len(p.blocks) == 3 and p.blocks[0].heads == 4
    assert p.blocks[0].mlp[0].out_features == 48
    assert p.query_pos.shape == (1, 7, 24) and p.visual_pos.shape == (1, 9, 24)
    assert p.query_embed.num_embeddings == 30 and p.head.out_features == 5


# ------------------------------------------------------------------------------------------ real towers


@pytest.fixture(scope="module")
def imagenet_lite0():
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(efficientnet_lite0_state_dict())
    return model.eval()


def _imagenet_pixels(model, arrays) -> torch.Tensor:
    from torchvision.transforms import functional as TF

    cfg = model.pretrained_cfg
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    out = []
    for a in arrays:
        img = Image.fromarray(a).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
        out.append(TF.normalize(TF.to_tensor(img), cfg["mean"], cfg["std"]))
    return torch.stack(out)


def test_efficientnet_lite0_package_weights_classify_real_photos(imagenet_lite0):
    from skimage import data

    with torch.no_grad():
        logits = imagenet_lite0(_imagenet_pixels(imagenet_lite0, [data.coffee(), data.chelsea()]))
    top1 = logits.argmax(1).tolist()
    assert top1[0] == 967  # espresso
    assert 281 <= top1[1] <= 285  # a domestic cat (tabby / tiger cat / Persian / Siamese / Egyptian)


def test_efficientnet_lite0_encoder_tokens_are_the_backbone_features(imagenet_lite0):
    enc = build_vision_encoder(VisionConfig(kind="efficientnet_lite0", weights="package", image_size=64))
    assert enc.mean == (0.5, 0.5, 0.5) and enc.std == (0.5, 0.5, 0.5)
    assert enc.out_dim == 320 and enc.num_tokens(64) == 4
    assert all(not p.requires_grad for p in enc.parameters()) and not enc.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = enc(x)
        # The encoder runs the CNN channels-last (faster on CPU); the same layout gives the same numbers,
        # the default layout the same up to float rounding.
        features = [imagenet_lite0.blocks(imagenet_lite0.bn1(imagenet_lite0.conv_stem(inp)))  # [2, 320, 2, 2]
                    for inp in (x.contiguous(memory_format=torch.channels_last), x)]
    assert tokens.shape == (2, 4, 320)
    torch.testing.assert_close(tokens, features[0].flatten(2).transpose(1, 2))
    torch.testing.assert_close(tokens, features[1].flatten(2).transpose(1, 2), atol=1e-4, rtol=1e-3)


def test_vision_registry_and_errors():
    with pytest.raises(ConfigError, match=r"unknown model.vision.kind 'resnet'; choose one of"):
        build_vision_encoder(VisionConfig(kind="resnet"))
    with pytest.raises(ConfigError, match="image_size=30 is not divisible by model.vision.patch_size=16"):
        build_vision_encoder(VisionConfig(kind="vit", image_size=30, dim=8, heads=2, depth=1))
    with pytest.raises(ConfigError, match="feature_stage=7 is out of range"):
        build_vision_encoder(VisionConfig(kind="timm", feature_stage=7, weights="none"))
    vit = build_vision_encoder(VisionConfig(kind="vit", image_size=32, patch_size=16, dim=8, heads=2, depth=1))
    assert vit(torch.randn(1, 3, 32, 32)).shape == (1, 4, 8) and vit.num_tokens(32) == 4


@pytest.fixture(scope="module")
def minilm():
    """The real all-MiniLM-L6-v2 Y-encoder, read offline from its PyPI package."""
    return build_text_encoder(TextConfig(path="package:all-minilm-l6-v2"))


def test_minilm_pooling_comes_from_the_package_files(minilm):
    folder = resolve_text_path("package:all-minilm-l6-v2")
    assert (Path(folder) / "1_Pooling" / "config.json").is_file()
    assert read_pooling(folder) == "mean"
    assert minilm.pooling == "mean" and minilm.hidden_size == 384
    assert not minilm.training and all(not p.requires_grad for p in minilm.parameters())


def test_minilm_ranks_a_puppy_closer_to_a_dog_than_to_a_car(minilm):
    tok = minilm.tokenize(["a dog", "a puppy", "a car"])
    with torch.no_grad():
        z = minilm(**tok).pooled
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
    dog, puppy, car = z
    assert puppy @ dog > puppy @ car + 0.1


def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(minilm.source, device="cpu")
    texts = ["a red circle left of a blue star", "yes", "how many objects are there?"]
    with torch.no_grad():
        ours = minilm(**minilm.tokenize(texts)).pooled
    theirs = torch.as_tensor(ref.encode(texts, normalize_embeddings=True))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_text_path_errors():
    with pytest.raises(ConfigError, match=r"unknown packaged text model 'bert'; known: \['all-minilm-l6-v2'\]"):
        resolve_text_path("package:bert")
    with pytest.raises(ConfigError, match="is not a folder; point it at a local model folder"):
        build_text_encoder(TextConfig(path="/nonexistent/minilm"))


# ------------------------------------------------------------------------------------------ VLJepa


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_frozen_parts_are_frozen_and_stay_in_eval_mode(tiny_model):
    m = tiny_model
    assert all(not p.requires_grad for p in m.vision.parameters())
    assert all(not p.requires_grad for p in m.text.parameters())
    assert all(p.requires_grad for p in m.predictor.parameters())
    assert all(p.requires_grad for p in m.target_head.parameters())
    assert m.logit_scale.requires_grad
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
    # ViT: patch conv (3*16*16*32 + 32) + positions (4*32) + one block + final norm
    assert s["vision"]["frozen"] > 3 * 16 * 16 * 32 + 32 + 4 * 32


def _caption_batch(model, texts, pixels) -> dict[str, torch.Tensor]:
    tok = model.tokenize(texts)
    return {"pixel_values": pixels, "target_ids": tok["input_ids"], "target_mask": tok["attention_mask"]}


def test_forward_returns_output_and_grads_only_on_trainable(tiny_model):
    m = copy.deepcopy(tiny_model).train()
    batch = _caption_batch(m, ["a red circle", "two blue stars", "a small green square"], _pixels(3))
    q = m.tokenize_queries(["what color is it?", "how many?", ""])
    batch.update(q)
    out = m(batch)
    assert isinstance(out, VLJepaOutput)
    assert out.pred.shape == (3, 16) and out.target.shape == (3, 16)
    torch.testing.assert_close(out.pred.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.target.norm(dim=-1), torch.ones(3))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.metrics) == {"p2t", "t2p", "batch_acc", "temperature"}
    assert out.metrics["temperature"] == pytest.approx(0.07, rel=1e-4)
    out.loss.backward()
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert m.logit_scale.grad is not None and m.logit_scale.grad != 0
    assert m.predictor.head.weight.grad.abs().sum() > 0 and m.target_head.out.weight.grad.abs().sum() > 0


def test_regression_loss_kind_in_forward(tiny_model):
    m = copy.deepcopy(tiny_model)
    m.config = copy.deepcopy(m.config)
    m.config.loss.kind = "cosine"
    batch = _caption_batch(m, ["a red circle", "a blue star"], _pixels(2))
    with torch.no_grad():
        out = m(batch)
    torch.testing.assert_close(out.loss, (1 - (out.pred * out.target).sum(-1)).mean())
    assert out.metrics == {}


def test_repeated_targets_are_embedded_once_and_match_separate_targets(tiny_model):
    m = tiny_model
    texts = ["yes", "red", "yes", "no", "red", "yes"]
    groups = torch.tensor([4, 2, 4, 7, 2, 4])
    pixels = _pixels(6, seed=1)
    batch = {**_caption_batch(m, texts, pixels), "target_groups": groups}
    batch.update(m.tokenize_queries(["is it red?", "what color?", "is it big?", "is it small?", "color?", "any?"]))
    calls = []
    hook = m.target_head.register_forward_hook(lambda mod, inp, out: calls.append(out.shape[0]))
    try:
        with torch.no_grad():
            out = m(batch)
    finally:
        hook.remove()
    assert calls == [3]  # three distinct answers went through the head, not six
    with torch.no_grad():
        # Each target on its own (no padding, no sharing), then the same grouped InfoNCE.
        separate = torch.cat([m.encode_text([t]) for t in texts])
        pred = m.predict(pixels, query_ids=batch["query_ids"], query_mask=batch["query_mask"])
        scale = m.logit_scale.exp().clamp(max=m.config.loss.max_logit_scale)
        ref = info_nce(pred, separate, scale, groups)
    torch.testing.assert_close(out.target, separate, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.loss, ref["loss"], atol=1e-5, rtol=1e-4)


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


def test_predict_needs_pixels_or_tokens(tiny_model):
    with pytest.raises(ValueError, match="predict needs pixel_values or visual_tokens"):
        tiny_model.predict()
    tokens = tiny_model.encode_image(_pixels(2))
    assert tokens.shape == (2, 4, 32)
    torch.testing.assert_close(tiny_model.predict(visual_tokens=tokens), tiny_model.predict(_pixels(2)))
    assert tiny_model.tokenize_queries(["", ""]) is None


@pytest.fixture(scope="module")
def saved_model(tiny_model, tmp_path_factory):
    return tiny_model.save_pretrained(tmp_path_factory.mktemp("saved") / "model")


def test_save_pretrained_then_from_pretrained_is_identical(tiny_model, saved_model):
    assert {p.name for p in saved_model.iterdir()} == {"config.json", "model.safetensors", "text_encoder", "README.md"}
    meta = json.loads((saved_model / "config.json").read_text())
    assert meta["format"] == "vljepa" and meta["model"]["target_head"] == "token"
    loaded = VLJepa.from_pretrained(saved_model)
    assert not loaded.training and loaded.config == tiny_model.config
    assert loaded.text.pooling == "mean"
    pixels = _pixels(3, seed=3)
    q = tiny_model.tokenize_queries(["what color is the star?", "", "how many?"])
    texts = ["a red circle", "yes", "three small squares from left to right"]
    with torch.no_grad():
        assert torch.equal(loaded.predict(pixels, **q), tiny_model.predict(pixels, **q))
        torch.testing.assert_close(loaded.encode_text(texts), tiny_model.encode_text(texts), atol=1e-6, rtol=1e-5)
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_from_pretrained_on_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(ConfigError, match=r"is not a vljepa model folder: no config\.json \(expected config\.json "
                                          r"\(format=vljepa\), model\.safetensors and text_encoder/\)"):
        VLJepa.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ConfigError, match="config.json lacks format=vljepa"):
        VLJepa.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        VLJepa.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "vljepa", "format_version": 1, "model": {}}))
    with pytest.raises(ConfigError, match="has config.json but no model.safetensors"):
        VLJepa.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "vljepa", "format_version": 99, "model": {}}))
    with pytest.raises(ConfigError, match=r"written by a newer vljepa \(format 99\); upgrade vljepa"):
        VLJepa.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"model '.*nowhere' not found: give a folder written by save_pretrained"):
        VLJepa.from_pretrained(tmp_path / "nowhere")


def test_save_pretrained_replaces_an_existing_folder_atomically(tiny_model, saved_model, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    (folder / "stale.txt").write_text("from an older save")
    m = copy.deepcopy(tiny_model)
    with torch.no_grad():
        m.predictor.head.bias.fill_(0.25)
    assert m.save_pretrained(folder) == folder
    assert not (folder / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or old folders left
    from safetensors.torch import load_file

    assert torch.all(load_file(str(folder / "model.safetensors"))["predictor.head.bias"] == 0.25)

    # A save that fails half-way leaves the previous model untouched and no temporary folder.
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    def broken_card(model):
        raise RuntimeError("disk full")

    monkeypatch.setattr(vljepa_module, "model_card", broken_card)
    with torch.no_grad():
        m.predictor.head.bias.fill_(-1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        m.save_pretrained(folder)
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_hybrid_target_head_adds_the_pooled_path(make_tiny_config):
    torch.manual_seed(0)
    m = VLJepa(make_tiny_config("hybrid")).train()
    assert m.target_head.needs_states and isinstance(m.target_head.skip, torch.nn.Linear)
    assert m.target_head.skip.in_features == m.text.hidden_size
    texts = ["yes", "no", "a red circle"]
    tok = m.tokenize(texts)
    feats = m.text_features(tok["input_ids"], tok["attention_mask"])
    z = m.embed_target(**feats)
    # The pooled path is part of the output: zeroing it changes every embedding.
    with torch.no_grad():
        m.target_head.skip.weight.zero_()
        m.target_head.skip.bias.zero_()
    assert not torch.allclose(m.embed_target(**feats), z)


def test_target_head_length_buckets_change_nothing(make_tiny_config):
    """Answers (a few tokens) and captions in one batch: read in length groups, the same embeddings."""
    torch.manual_seed(0)
    m = VLJepa(make_tiny_config("hybrid")).train()
    texts = ["yes", "no", "two", "a red circle", "a small red circle to the left of a large blue square",
             "there is a big green star above a small yellow triangle and a red circle", "red"] * 3
    tok = m.tokenize(texts)
    feats = m.text_features(tok["input_ids"], tok["attention_mask"])
    assert len(length_buckets(feats["mask"].sum(1))) > 1
    outs = []
    for buckets in (1, 4):
        m.target_head.max_length_buckets = buckets
        outs.append(m.embed_target(**feats))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


def _yes_no_step(config):
    """A hybrid-head model of ``config`` and its output on answers yes / no / yes (grouped)."""
    torch.manual_seed(0)
    m = VLJepa(config).train()
    batch = _caption_batch(m, ["yes", "no", "yes"], _pixels(3))
    batch["target_groups"] = torch.tensor([0, 1, 0])
    return m, batch, m(batch)


def test_target_uniformity_term_enters_the_loss(make_tiny_config):
    m, batch, out = _yes_no_step(make_tiny_config("hybrid", "model.loss.target_uniformity=0.5"))
    assert "uniformity" in out.metrics
    plain = m.loss_terms(out.pred, out.target, batch["target_groups"])
    base = info_nce(out.pred, out.target, m.logit_scale.exp(), batch["target_groups"])["loss"]
    torch.testing.assert_close(plain["loss"], base + 0.5 * plain["uniformity"])
    out.loss.backward()
    assert m.target_head.skip.weight.grad.abs().sum() > 0


def test_target_spread_term_enters_the_loss(make_tiny_config):
    # A head that maps every text near one point merges "yes" and "no", which Y keeps at cos ~0.73.
    def merging_head(m):
        with torch.no_grad():
            m.target_head.out.weight.mul_(0.01)
            m.target_head.skip.weight.mul_(0.01)
        return m

    m, batch, out = _yes_no_step(make_tiny_config("hybrid", "model.loss.target_spread=2.0"))
    merging_head(m)
    out = m(batch)
    # Both distinct answers have the same excess of head cosine over Y cosine; the term sums the two.
    tok = m.tokenize(["yes", "no"])
    feats = m.text_features(tok["input_ids"], tok["attention_mask"])
    t, y = m.embed_target(**feats), F.normalize(feats["pooled"], dim=-1)
    excess = float((t[0] @ t[1] - y[0] @ y[1]).clamp_min(0).detach())
    assert excess > 0.1
    assert out.metrics["spread"] == pytest.approx(2 * excess, abs=1e-5)
    plain = m.loss_terms(out.pred, out.target, batch["target_groups"])
    torch.testing.assert_close(out.loss, plain["loss"] + 2.0 * torch.tensor(out.metrics["spread"]))
    out.loss.backward()
    assert m.target_head.out.weight.grad.abs().sum() > 0


def test_predictor_registers_are_attended_not_pooled(make_tiny_config):
    from vljepa.config import ConfigError

    torch.manual_seed(0)
    m = VLJepa(make_tiny_config("hybrid", "model.predictor.registers=3")).eval()
    assert m.predictor.registers.shape == (1, 3, m.config.predictor.dim)
    pixels = _pixels(2)
    q = m.tokenize_queries(["what color is the circle?", "is there a star?"])
    before = m.predict(pixels, **q)
    assert before.shape == (2, m.config.embed_dim)
    # The registers change what the tokens attend to, hence the prediction, with or without a query.
    with torch.no_grad():
        m.predictor.registers.add_(1.0)
    assert not torch.allclose(m.predict(pixels, **q), before)
    assert m.predict(pixels).shape == (2, m.config.embed_dim)
    with pytest.raises(ConfigError, match="registers"):
        VLJepa(make_tiny_config("hybrid", "model.predictor.registers=-1"))


def test_predictor_query_pool_reads_query_tokens_and_captions_off_the_image(make_tiny_config):
    torch.manual_seed(0)
    m = VLJepa(make_tiny_config("hybrid", "model.predictor.pool=query")).eval()
    pixels = _pixels(3)
    q = m.tokenize_queries(["what color is the circle?", "", "is there a star?"])
    q["query_mask"][1] = 0  # row 1 is a caption, as the collator pads it in a mixed batch: no query token
    mixed = m.predict(pixels, **q)
    # A row without a query is read off its image tokens: the same as predicting it query-free.
    torch.testing.assert_close(mixed[1], m.predict(pixels[1:2])[0], atol=1e-5, rtol=1e-5)
    # Rows with a query read their query tokens: the "all" readout of the same weights differs.
    m_all = VLJepa(make_tiny_config("hybrid")).eval()
    m_all.load_state_dict(m.state_dict())
    assert not torch.allclose(m_all.predict(pixels, **q)[0], mixed[0])
    torch.testing.assert_close(m_all.predict(pixels[1:2])[0], mixed[1], atol=1e-5, rtol=1e-5)


def test_predictor_swiglu_blocks(make_tiny_config):
    from vljepa.models.predictor import SwiGLU

    m = VLJepa(make_tiny_config("hybrid", "model.predictor.mlp=swiglu")).eval()
    assert all(isinstance(b.mlp, SwiGLU) for b in m.predictor.blocks)
    q = m.tokenize_queries(["is the circle red?"])
    assert m.predict(_pixels(1), **q).shape == (1, m.config.embed_dim)
    with pytest.raises(ConfigError, match="mlp"):
        VLJepa(make_tiny_config("hybrid", "model.predictor.mlp=relu"))


def test_predictor_text_query_tokens_read_y_states_once(make_tiny_config, monkeypatch):
    """query_tokens=text: the query tokens are the frozen Y-encoder's token states (through a trained
    linear map); each distinct query goes through Y once, and the result equals reading it afresh."""
    torch.manual_seed(0)
    m = VLJepa(make_tiny_config("hybrid", "model.predictor.query_tokens=text")).eval()
    assert not hasattr(m.predictor, "query_embed")  # no vocabulary table to train
    pixels = _pixels(3)
    q = m.tokenize_queries(["is the circle red?", "is there a star?", "is the circle red?"])
    calls = []
    real_forward = type(m.text).forward

    def counting(self, ids, mask):
        calls.append(ids.shape[0])
        return real_forward(self, ids, mask)

    monkeypatch.setattr(type(m.text), "forward", counting)
    first = m.predict(pixels, **q)
    assert calls == [2]  # two distinct queries, one Y call
    again = m.predict(pixels, **q)
    assert calls == [2]  # remembered
    torch.testing.assert_close(first, again)
    # The states are Y's own: the same as running Y on one query alone, padding zeroed.
    one = m.tokenize_queries(["is there a star?"])
    with torch.no_grad():
        y = real_forward(m.text, one["query_ids"], one["query_mask"]).states[0]
    states = m.query_states(q["query_ids"], q["query_mask"])
    n = int(one["query_mask"].sum())
    torch.testing.assert_close(states[1, :n], y[:n])
    assert states[1, n:].abs().sum() == 0
    # The words matter: another question gives another prediction for the same image.
    other = m.tokenize_queries(["is the circle blue?"] * 3)
    assert not torch.allclose(m.predict(pixels, **other)[0], first[0])
    # A query-free row of a mixed batch: zeros, no Y call for it.
    q["query_mask"][1] = 0
    assert m.query_states(q["query_ids"], q["query_mask"])[1].abs().sum() == 0
    # The linear map is trained: gradients reach it through a loss on the prediction.
    m.train()
    m.predict(pixels, **q).sum().backward()
    assert m.predictor.query_in[1].weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="query_tokens"):
        VLJepa(make_tiny_config("hybrid", "model.predictor.query_tokens=states"))


def test_predictor_word_query_tokens_start_from_y_word_embeddings(make_tiny_config, tmp_path):
    """query_tokens=words: a query token is a trained linear map of the frozen Y-encoder's input word
    embedding plus a learned per-word offset that starts at zero. Words Y embeds alike start alike;
    the map and the offsets train, Y's table does not."""
    torch.manual_seed(0)
    m = VLJepa(make_tiny_config("hybrid", "model.predictor.query_tokens=words")).eval()
    table = m.text.model.get_input_embeddings().weight
    assert m.predictor.query_embed.weight.abs().sum() == 0 and not table.requires_grad
    q = m.tokenize_queries(["how many circles are there?", "is there a red circle?"])
    torch.testing.assert_close(m.text.word_embeddings(q["query_ids"]), table[q["query_ids"]])
    # Before any training the query tokens are the map of Y's word embeddings.
    words = m.predictor.query_in(m.text.word_embeddings(q["query_ids"]))
    ids = q["query_ids"][0].tolist()
    same = [m.predictor.query_in(table[i]) for i in ids]
    torch.testing.assert_close(words[0], torch.stack(same))
    # The words matter: another question gives another prediction for the same image.
    pixels = _pixels(2)
    first = m.predict(pixels, **q)
    other = m.tokenize_queries(["how many stars are there?", "is there a blue star?"])
    assert not torch.allclose(m.predict(pixels, **other), first)
    # Gradients reach the map and the offsets of the words used, not Y's table.
    m.train()
    m.predict(pixels, **q).sum().backward()
    assert m.predictor.query_in[1].weight.grad.abs().sum() > 0
    grad = m.predictor.query_embed.weight.grad
    used = torch.zeros(grad.shape[0], dtype=torch.bool)
    used[q["query_ids"].flatten()] = True
    assert grad[used].abs().sum(1).gt(0).sum() > 0 and grad[~used].abs().sum() == 0
    assert table.grad is None
    # After a step the offsets are part of the model: a saved and reloaded model answers the same.
    with torch.no_grad():
        for p in m.predictor.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    m.eval()
    before = m.predict(pixels, **q)
    again = VLJepa.from_pretrained(m.save_pretrained(tmp_path / "words")).eval()
    torch.testing.assert_close(again.predict(pixels, **q), before)


def test_predictor_match_branch(make_tiny_config):
    """fusion=match: a per-image-token product with the query's words, added to the pooled state; a
    row without a query is left as the transformer alone gives it."""
    torch.manual_seed(0)
    m = VLJepa(make_tiny_config("hybrid", "model.predictor.fusion=match", "model.predictor.fusion_rank=8")).eval()
    assert m.predictor.match.mix.weight.shape == (8, 8)
    plain = VLJepa(make_tiny_config("hybrid")).eval()
    missing, unexpected = plain.load_state_dict(m.state_dict(), strict=False)
    assert not missing and all(k.startswith("predictor.match.") for k in unexpected)
    pixels = _pixels(3)
    q = m.tokenize_queries(["is there a red circle?", "", "is there a blue star?"])
    q["query_mask"][1] = 0  # a caption row of a mixed batch
    with_match, without = m.predict(pixels, **q), plain.predict(pixels, **q)
    torch.testing.assert_close(with_match[1], without[1])  # no query: the branch adds nothing
    assert not torch.allclose(with_match[0], without[0])  # a query: it does
    torch.testing.assert_close(m.predict(pixels), plain.predict(pixels))  # query-free batches too
    # The branch reads the words: another question, another prediction.
    other = m.tokenize_queries(["is there a green square?"] * 3)
    assert not torch.allclose(m.predict(pixels, **other)[0] - plain.predict(pixels, **other)[0],
                              with_match[0] - without[0])
    m.train()
    m.predict(pixels, **q).sum().backward()
    for name in ("visual.1.weight", "word.1.weight", "mix.weight", "out.weight"):
        assert m.predictor.match.get_parameter(name).grad.abs().sum() > 0, name
    with pytest.raises(ConfigError, match="fusion"):
        VLJepa(make_tiny_config("hybrid", "model.predictor.fusion=bilinear"))
