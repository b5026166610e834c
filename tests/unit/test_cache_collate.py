"""The embedding cache of frozen towers, batching (collate) and the optimiser's groups and schedule."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from PIL import Image

from vljepa.config import OptimConfig, VisionConfig
from vljepa.data import cache as cache_module
from vljepa.data.cache import EmbeddingCache, cache_key, file_items
from vljepa.data.collate import Collator, ExampleIndex, Examples, TextTable, pad_ids
from vljepa.data.formats import SkipReport
from vljepa import embed
from vljepa.embed import cached_image_tokens, cached_text_features, encode_images, pixel_loader
from vljepa.models.vision import PatchViT
from vljepa.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups

# ------------------------------------------------------------------------------------------ cache


def test_cache_save_load_round_trip_across_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "SHARD_ITEMS", 3)
    cache = EmbeddingCache(tmp_path / "cache")
    sharded = {"tokens": torch.randn(7, 2, 4), "ok": torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)}
    whole = {"offsets": torch.tensor([0, 2, 5]), "states": torch.randn(5, 4)}
    assert cache.load("k1") is None
    cache.save("k1", sharded, whole, info={"what": "test"})
    entry = tmp_path / "cache" / "k1"
    assert sorted(p.name for p in entry.iterdir()) == [
        "manifest.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors",
        "whole.safetensors"]
    back = cache.load("k1")
    assert set(back) == {"tokens", "ok", "offsets", "states"}
    for k, v in {**sharded, **whole}.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    # Saving the same key again replaces the entry; no temporary folders are left behind.
    cache.save("k1", {"tokens": torch.zeros(2, 1)})
    assert set(cache.load("k1")) == {"tokens"} and cache.load("k1")["tokens"].shape == (2, 1)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["k1"]


def test_cache_key_changes_with_identity_or_items():
    ident = {"kind": "vit", "image_size": 32}
    key = cache_key(ident, ["a.png", "b.png"])
    assert len(key) == 32 and key == cache_key({"image_size": 32, "kind": "vit"}, ["a.png", "b.png"])
    assert cache_key({**ident, "image_size": 64}, ["a.png", "b.png"]) != key
    assert cache_key(ident, ["a.png", "c.png"]) != key
    assert cache_key(ident, ["b.png", "a.png"]) != key  # order matters: rows index the items
    assert cache_key(ident, ["a.png", "b.png", "c.png"]) != key
    assert cache_key(ident, ["a.pngb.png"]) != cache_key(ident, ["a.png", "b.png"])  # items are separated


def test_get_or_compute_computes_once(tmp_path):
    cache = EmbeddingCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"pooled": torch.arange(6.0).view(3, 2)}, {"offsets": torch.tensor([0, 1, 3, 4])}

    first, hit1 = cache.get_or_compute({"text": "minilm"}, ["a", "b", "c"], compute)
    second, hit2 = cache.get_or_compute({"text": "minilm"}, ["a", "b", "c"], compute)
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    assert set(first) == set(second) == {"pooled", "offsets"}
    for k in first:
        assert torch.equal(first[k], second[k])
    _, hit3 = cache.get_or_compute({"text": "minilm"}, ["a", "b"], compute)
    assert not hit3 and len(calls) == 2
    # key_items (e.g. paths with mtimes) decide the key when given.
    _, hit4 = cache.get_or_compute({"text": "minilm"}, ["x", "y", "z"], compute, key_items=["a", "b", "c"])
    assert hit4 and len(calls) == 2


def test_file_items_change_when_a_file_is_modified(tmp_path):
    f = tmp_path / "img.png"
    f.write_bytes(b"12345")
    before = file_items([str(f)])
    assert before == file_items([str(f)])
    f.write_bytes(b"123456")  # another size
    grown = file_items([str(f)])
    assert grown != before
    f.write_bytes(b"654321")  # same size, later modification time
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert file_items([str(f)]) != grown
    assert file_items([str(tmp_path / "gone.png")]) == [f"{tmp_path / 'gone.png'}|missing"]


def _images(folder, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i}.png"
        Image.new("RGB", (32, 32), (40 * i, 100, 200)).save(p)
        paths.append(str(p))
    return paths


def test_cached_image_tokens_hit_equals_miss_and_replays_skips(tiny_model, tmp_path):
    paths = _images(tmp_path / "img", 3)
    bad = tmp_path / "img" / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    paths.append(str(bad))
    cache = EmbeddingCache(tmp_path / "cache")
    r1, r2 = SkipReport(), SkipReport()
    t1, ok1, hit1 = cached_image_tokens(tiny_model, paths, cache, on_error="skip", report=r1)
    t2, ok2, hit2 = cached_image_tokens(tiny_model, paths, cache, on_error="skip", report=r2)
    assert (hit1, hit2) == (False, True)
    assert t1.shape == (4, 4, 32) and torch.equal(t1, t2)
    assert ok1.tolist() == ok2.tolist() == [True, True, True, False]
    assert r1.counts == r2.counts == {"unreadable image": 1} and r2.examples["unreadable image"] == [str(bad)]
    with torch.no_grad():  # the cached tokens are the X-encoder's output for the preprocessed image
        with Image.open(paths[0]) as img:
            pixels = pixel_loader(tiny_model)(img.convert("RGB"))
        torch.testing.assert_close(t1[0], tiny_model.vision(pixels[None])[0])
    # Editing an image changes its key: the cache is not read stale.
    Image.new("RGB", (32, 32), (0, 0, 0)).save(paths[0])
    os.utime(paths[0], ns=(0, os.stat(paths[0]).st_mtime_ns + 1_000_000_000))
    t3, _, hit3 = cached_image_tokens(tiny_model, paths, cache, on_error="skip", report=SkipReport())
    assert not hit3 and not torch.equal(t3[0], t1[0]) and torch.equal(t3[1:3], t1[1:3])


def test_encode_images_in_cpu_chunks_equals_one_batch(tiny_model, tmp_path, monkeypatch):
    """The vision tower runs in chunks on the CPU; every image (the last partial chunk too) is encoded once."""
    paths = _images(tmp_path / "img", 7)
    whole, ok = encode_images(tiny_model, paths, batch_size=5)
    monkeypatch.setattr(embed, "CPU_VISION_CHUNK", 2)
    chunked, ok2 = encode_images(tiny_model, paths, batch_size=5)
    assert chunked.shape == whole.shape == (7, 4, 32) and ok.all() and ok2.all()
    torch.testing.assert_close(chunked, whole)
    assert not torch.allclose(whole[0], whole[1])  # distinct images stay distinct (no chunk repeated)


def test_a_different_vit_does_not_read_cached_tokens(tiny_model, tmp_path):
    paths = _images(tmp_path / "img", 2)
    cache = EmbeddingCache(tmp_path / "cache")
    tokens, _, _ = cached_image_tokens(tiny_model, paths, cache, on_error="stop", report=SkipReport())
    assert tokens.shape[-1] == 32
    other = copy.deepcopy(tiny_model)
    wider = VisionConfig(kind="vit", image_size=32, patch_size=16, dim=48, depth=1, heads=2)
    other.vision = PatchViT(wider).requires_grad_(False).eval()
    other.config.vision = wider
    tokens2, _, hit = cached_image_tokens(other, paths, cache, on_error="stop", report=SkipReport())
    assert not hit
    assert tokens2.shape[-1] == 48


def test_cached_text_features_key_includes_states(tiny_model, tmp_path):
    cache = EmbeddingCache(tmp_path)
    texts = ["a red circle", "yes", "two big stars"]
    pooled_only, hit1 = cached_text_features(tiny_model, texts, cache, with_states=False)
    with_states, hit2 = cached_text_features(tiny_model, texts, cache, with_states=True)
    again, hit3 = cached_text_features(tiny_model, texts, cache, with_states=True)
    assert (hit1, hit2, hit3) == (False, False, True)
    assert set(pooled_only) == {"pooled"} and set(with_states) == {"pooled", "states", "offsets"}
    for k in with_states:
        assert torch.equal(with_states[k], again[k])
    torch.testing.assert_close(pooled_only["pooled"], with_states["pooled"])
    lengths = [len(tiny_model.tokenize([t])["input_ids"][0]) for t in texts]
    assert with_states["offsets"].tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]


# ------------------------------------------------------------------------------------------ collate


def test_pad_ids():
    ids, mask = pad_ids([[5, 6, 7], [], [8]])
    assert ids.tolist() == [[5, 6, 7], [0, 0, 0], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 0], [1, 0, 0]]
    ids, mask = pad_ids([[], []])
    assert ids.shape == mask.shape == (2, 1) and mask.sum() == 0


def _examples(n: int = 40, choices: int = 5) -> Examples:
    return Examples(
        image=[i % 4 for i in range(n)],
        query=[[] for _ in range(n)],
        targets=[tuple(range(i * choices, (i + 1) * choices)) for i in range(n)],
    )


def _collator(examples: Examples, seed: int = 0) -> Collator:
    n_texts = max(t for ts in examples.targets for t in ts) + 1
    table = TextTable(pooled=torch.arange(float(n_texts)).view(-1, 1))
    return Collator(examples, table, visual_tokens=torch.arange(4.0).view(4, 1, 1), seed=seed)


def test_caption_choice_is_deterministic_per_seed_and_epoch():
    ex = _examples()
    idx = list(range(len(ex)))
    a, b = _collator(ex), _collator(ex)
    first = a(idx)["target_groups"]
    assert torch.equal(first, b(idx)["target_groups"])  # same (seed, epoch): same captions
    assert torch.equal(first, a(idx)["target_groups"])  # and again on a second pass
    for i, t in enumerate(first.tolist()):
        assert t in ex.targets[i]
    a.set_epoch(1)
    second = a(idx)["target_groups"]
    assert not torch.equal(first, second)  # another epoch draws other captions
    b.set_epoch(1)
    assert torch.equal(second, b(idx)["target_groups"])
    assert not torch.equal(first, _collator(ex, seed=1)(idx)["target_groups"])  # another seed too
    # The choice of an example does not depend on which batch it lands in.
    assert a([7, 3])["target_groups"].tolist() == [second[7].item(), second[3].item()]


def test_collator_batch_keys_and_query_padding():
    ex = Examples(image=[2, 0, 1], query=[[5, 6, 7], [], [8]], targets=[(4,), (1, 1), (0,)])
    table = TextTable(pooled=torch.arange(10.0).view(5, 2))
    tokens = torch.arange(3 * 2 * 3, dtype=torch.float).view(3, 2, 3)
    batch = Collator(ex, table, visual_tokens=tokens)([0, 1, 2])
    assert set(batch) == {"visual_tokens", "query_ids", "query_mask", "target_pooled", "target_groups"}
    assert torch.equal(batch["visual_tokens"], tokens[[2, 0, 1]])
    assert batch["query_ids"].tolist() == [[5, 6, 7], [0, 0, 0], [8, 0, 0]]
    assert batch["query_mask"].tolist() == [[1, 1, 1], [0, 0, 0], [1, 0, 0]]
    assert batch["target_groups"].tolist() == [4, 1, 0]
    assert torch.equal(batch["target_pooled"], table.pooled[[4, 1, 0]])
    # Query-free batches carry no query keys at all.
    assert "query_ids" not in Collator(ex, table, visual_tokens=tokens)([1])


def test_collator_loads_pixels_and_needs_exactly_one_source():
    ex = Examples(image=[1, 0], query=[[], []], targets=[(0,), (1,)])
    table = TextTable(token_ids=[[101, 7, 102], [101, 102]])
    batch = Collator(ex, table, load_pixels=lambda j: torch.full((3, 2, 2), float(j)))([0, 1])
    assert batch["pixel_values"].shape == (2, 3, 2, 2) and batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 0.0]
    assert batch["target_ids"].tolist() == [[101, 7, 102], [101, 102, 0]]
    assert batch["target_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    with pytest.raises(ValueError, match="exactly one of visual_tokens"):
        Collator(ex, table)
    with pytest.raises(ValueError, match="exactly one of visual_tokens"):
        Collator(ex, table, visual_tokens=torch.zeros(2, 1, 1), load_pixels=lambda j: torch.zeros(3))
    with pytest.raises(ValueError, match="needs cached features"):
        TextTable()
    assert len(ExampleIndex(5)) == 5 and ExampleIndex(5)[3] == 3


def test_text_table_flat_states_to_padded_states():
    states = torch.arange(6 * 2, dtype=torch.float).view(6, 2)  # texts of 2, 3 and 1 tokens
    offsets = torch.tensor([0, 2, 5, 6])
    table = TextTable(pooled=torch.eye(3), states=states, offsets=offsets)
    out = table.batch(torch.tensor([2, 0, 1]))
    assert set(out) == {"target_pooled", "target_states", "target_mask"}
    assert out["target_states"].shape == (3, 3, 2)
    assert out["target_mask"].tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert torch.equal(out["target_states"][0, :1], states[5:6])
    assert torch.equal(out["target_states"][1, :2], states[0:2])
    assert torch.equal(out["target_states"][2], states[2:5])
    assert out["target_states"][0, 1:].abs().sum() == 0 and out["target_states"][1, 2:].abs().sum() == 0
    assert torch.equal(out["target_pooled"], torch.eye(3)[[2, 0, 1]])


# ------------------------------------------------------------------------------------------ optim


def test_param_groups_leave_out_frozen_and_skip_decay_on_biases_and_norms(tiny_model):
    cfg = OptimConfig(lr=0.01, weight_decay=0.1, head_lr_mult=2.0)
    groups = param_groups(tiny_model, cfg, text_lr_mult=0.0)
    grouped = {id(p): g for g in groups for p in g["params"]}
    named = dict(tiny_model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert {n for n, p in named.items() if id(p) in grouped} == trainable
    assert not any(n.startswith(("vision.", "text.")) for n in trainable)
    assert sum(len(g["params"]) for g in groups) == len(trainable)  # each parameter once

    def group(name):
        return grouped[id(named[name])]

    assert group("predictor.blocks.0.qkv.weight")["weight_decay"] == 0.1
    for name in ("predictor.blocks.0.qkv.bias", "predictor.blocks.0.norm1.weight", "predictor.norm.bias",
                 "predictor.query_embed.weight", "predictor.visual_pos", "criterion.logit_scale"):
        assert group(name)["weight_decay"] == 0.0, name
    assert group("target_head.out.weight")["lr"] == pytest.approx(0.02)
    assert group("target_head.out.weight")["weight_decay"] == 0.1
    assert group("target_head.out.bias")["lr"] == pytest.approx(0.02)
    assert group("predictor.head.weight")["lr"] == pytest.approx(0.01)


def test_trainable_text_encoder_gets_its_lr_multiplier(tiny_model):
    m = copy.deepcopy(tiny_model)
    m.text.requires_grad_(True)
    groups = param_groups(m, OptimConfig(lr=0.01), text_lr_mult=0.05)
    word = m.text.model.embeddings.word_embeddings.weight
    query = next(p for n, p in m.text.named_parameters() if n.endswith("query.weight"))
    assert next(g for g in groups if any(p is word for p in g["params"]))["lr"] == pytest.approx(0.0005)
    g = next(g for g in groups if any(p is query for p in g["params"]))
    assert g["lr"] == pytest.approx(0.0005) and g["weight_decay"] == 0.05
    frozen = copy.deepcopy(tiny_model)
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, OptimConfig(), text_lr_mult=0.0)


def test_lr_factor_warmup_and_cosine_endpoints():
    kw = dict(total=100, warmup=10, schedule="cosine", min_ratio=0.1)
    assert lr_factor(0, **kw) == pytest.approx(0.1)  # (step + 1) / warmup
    assert lr_factor(4, **kw) == pytest.approx(0.5)
    assert lr_factor(9, **kw) == pytest.approx(1.0)
    assert lr_factor(10, **kw) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_factor(55, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half way
    assert lr_factor(100, **kw) == pytest.approx(0.1)  # ends at min_ratio
    assert lr_factor(500, **kw) == pytest.approx(0.1)  # and stays there
    values = [lr_factor(s, **kw) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    assert lr_factor(50, total=100, warmup=10, schedule="constant", min_ratio=0.1) == 1.0
    assert lr_factor(0, total=100, warmup=0, schedule="cosine", min_ratio=0.0) == pytest.approx(1.0)


def test_scheduler_scales_every_group_by_the_factor(tiny_model):
    cfg = OptimConfig(lr=0.01, warmup_steps=2, min_lr_ratio=0.0, head_lr_mult=3.0)
    opt = build_optimizer(tiny_model, cfg, text_lr_mult=0.0)
    sched = build_scheduler(opt, cfg, total_steps=4)
    seen = []
    for _ in range(5):
        seen.append(sorted(round(g["lr"], 8) for g in opt.param_groups))
        opt.step()
        sched.step()
    assert seen[0][0] == pytest.approx(0.005) and seen[0][-1] == pytest.approx(0.015)  # warmup 1/2
    assert seen[1][0] == pytest.approx(0.01) and seen[1][-1] == pytest.approx(0.03)
    assert seen[4][0] == pytest.approx(0.0, abs=1e-12)  # cosine to 0 at the last step


def test_build_optimizer_fused_on_cpu_takes_the_loop_implementations_steps(tiny_model):
    cfg = OptimConfig(lr=0.01, head_lr_mult=3.0, weight_decay=0.1)
    opt = build_optimizer(tiny_model, cfg, text_lr_mult=0.0)
    assert all(g["fused"] for g in opt.param_groups)
    assert not build_optimizer(tiny_model, cfg, text_lr_mult=0.0, device="meta").defaults["fused"]
    start = {n: p.detach().clone() for n, p in tiny_model.named_parameters() if p.requires_grad}
    reference = torch.optim.AdamW(param_groups(tiny_model, cfg, text_lr_mult=0.0), lr=cfg.lr, betas=cfg.betas,
                                  eps=cfg.eps, foreach=False)
    grads = {n: torch.randn_like(p) for n, p in start.items()}
    after = []
    for optimizer in (opt, reference):
        with torch.no_grad():
            for n, p in tiny_model.named_parameters():
                if n in start:
                    p.copy_(start[n])
        for _ in range(3):
            for n, p in tiny_model.named_parameters():
                if n in start:
                    p.grad = grads[n].clone()
            optimizer.step()
        after.append({n: p.detach().clone() for n, p in tiny_model.named_parameters() if n in start})
    with torch.no_grad():  # the model is shared with other tests: put its weights back
        for n, p in tiny_model.named_parameters():
            if n in start:
                p.copy_(start[n])
                p.grad = None
    for n in start:
        assert not torch.equal(after[0][n], start[n]), n
        torch.testing.assert_close(after[0][n], after[1][n], atol=1e-6, rtol=1e-5, msg=n)


def test_embed_texts_in_length_order_returns_the_given_order(tiny_model, monkeypatch):
    texts = ["a much longer caption about a small red circle left of a big blue square", "yes",
             "a red circle", "no", "two", "a blue star above a green triangle"]
    monkeypatch.setattr(embed, "CPU_TEXT_CHUNK", 2)  # several chunks, each of texts sorted by length
    with torch.no_grad():
        one_by_one = torch.cat([tiny_model.encode_text([t]) for t in texts])
        toks = [tiny_model.tokenize([t]) for t in texts]
        feats_one = [tiny_model.text_features(tok["input_ids"], tok["attention_mask"]) for tok in toks]
    got = embed.embed_texts(tiny_model, texts)
    torch.testing.assert_close(got, one_by_one, atol=1e-5, rtol=1e-5)
    feats = embed.encode_text_features(tiny_model, texts, with_states=True)
    for i, f in enumerate(feats_one):
        torch.testing.assert_close(feats["pooled"][i], f["pooled"][0], atol=1e-5, rtol=1e-5)
        n = int(feats["offsets"][i + 1] - feats["offsets"][i])
        assert n == int(f["mask"].sum())
        torch.testing.assert_close(feats["states"][feats["offsets"][i]:feats["offsets"][i + 1]],
                                   f["states"][0, :n], atol=1e-5, rtol=1e-5)
    assert embed.embed_texts(tiny_model, []).shape == (0, tiny_model.config.embed_dim)


def test_collator_pads_query_states_from_the_query_table():
    states = torch.arange(10.0).view(5, 2)  # query 1: 2 tokens, query 2: 3 tokens (row 0 = no query)
    table = TextTable(pooled=torch.zeros(3, 1), states=states, offsets=torch.tensor([0, 0, 2, 5]))
    ex = Examples(image=[0, 1, 0], query=[[7, 8], [], [4, 5, 6]], targets=[(0,), (1,), (0,)], query_row=[1, 0, 2])
    batch = Collator(ex, TextTable(pooled=torch.zeros(2, 1)), visual_tokens=torch.zeros(2, 1, 1),
                     query_table=table)([0, 1, 2])
    assert batch["query_states"].shape == (3, 3, 2) == (*batch["query_ids"].shape, 2)
    assert batch["query_states"][0].tolist() == [[0, 1], [2, 3], [0, 0]]
    assert batch["query_states"][1].abs().sum() == 0  # the query-free row
    assert batch["query_states"][2].tolist() == [[4, 5], [6, 7], [8, 9]]
    with pytest.raises(ValueError, match="query_table needs token states and examples with query_row"):
        Collator(Examples(image=[0], query=[[1]], targets=[(0,)]), table, visual_tokens=torch.zeros(1, 1, 1),
                 query_table=table)
