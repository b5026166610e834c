"""X-encoders behind one interface: Hugging Face towers (CLIP, SigLIP, DINOv2, ViT, V-JEPA 2),
open_clip visual towers, video (frames + temporal embedding, or V-JEPA 2 tubelets), LoRA adapters,
cache identities and weights files. Every pretrained architecture is a tiny random config of the real class,
saved to disk and read back through the same code path that loads the full-size model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from vljepa.config import ConfigError, LoraConfig, VisionConfig
from vljepa.models.vision import IMAGENET_MEAN, IMAGENET_STD, VisionEncoder, build_vision_encoder
from vljepa.models.weights import read_state_dict

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=32,
            patch_size=8)
VJEPA2_TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, crop_size=32, patch_size=8,
                   frames_per_clip=4, tubelet_size=2, pred_hidden_size=16, pred_num_hidden_layers=1,
                   pred_num_attention_heads=2, num_pooler_layers=1)
# (preprocessor file written next to the model or None, expected mean, expected std)
HF_STATS = {
    "clip": ("preprocessor_config.json", (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)),
    "siglip": ("preprocessor_config.json", (0.25, 0.25, 0.25), (0.75, 0.75, 0.75)),
    "dinov2": (None, IMAGENET_MEAN, IMAGENET_STD),
    "vit": (None, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "vjepa2": ("video_preprocessor_config.json", (0.4, 0.4, 0.4), (0.2, 0.2, 0.2)),
}
PREFIX_TOKENS = {"clip": 1, "siglip": 0, "dinov2": 1, "vit": 1}  # class tokens the encoder drops
TIMM = dict(kind="timm", name="tf_efficientnet_lite0", path="")  # a randomly initialised timm CNN


def _pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Tiny real-class models saved as Hub-style folders: {kind: (folder, reference module)}."""
    t = transformers
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=99,
                bos_token_id=0, eos_token_id=1)
    models = {
        # A whole CLIP pair: the encoder must take its vision tower.
        "clip": t.CLIPModel(t.CLIPConfig(vision_config=TINY, text_config=text, projection_dim=16)),
        "siglip": t.SiglipVisionModel(t.SiglipVisionConfig(**TINY)),
        "dinov2": t.Dinov2Model(t.Dinov2Config(**TINY)),
        "vit": t.ViTModel(t.ViTConfig(**TINY)),
        "vjepa2": t.VJEPA2Model(t.VJEPA2Config(**VJEPA2_TINY)),
    }
    out = {}
    for kind, model in models.items():
        folder = root / kind
        model.save_pretrained(folder)
        filename, mean, std = HF_STATS[kind]
        if filename:
            (folder / filename).write_text(json.dumps({"image_mean": mean, "image_std": std, "crop_size": 32}))
        ref = model.vision_model if kind == "clip" else model
        out[kind] = (folder, ref.eval())
    return out


def _hf(folder, **kw) -> VisionEncoder:
    return build_vision_encoder(VisionConfig(kind="hf", path=str(folder), image_size=32, **kw))


def _reference_tokens(kind: str, ref, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if kind == "vjepa2":
            clip = pixels if pixels.ndim == 5 else pixels.unsqueeze(1)
            return ref.get_vision_features(clip)
        return ref(pixel_values=pixels).last_hidden_state[:, PREFIX_TOKENS[kind]:]


# ------------------------------------------------------------------------------------------ Hugging Face


@pytest.mark.parametrize("kind", list(HF_STATS))
def test_hf_tokens_are_the_models_patch_states(hf_models, kind):
    folder, ref = hf_models[kind]
    enc = _hf(folder)
    _, mean, std = HF_STATS[kind]
    assert enc.mean == pytest.approx(mean) and enc.std == pytest.approx(std)
    assert enc.out_dim == 32 and enc.num_tokens(32) == 16 and enc.native_image_size == 32
    assert enc.static and not enc.training and not _trainable(enc)
    x = _pixels(2, 3, 32, 32)
    with torch.no_grad():
        tokens = enc(x)
    assert tokens.shape == (2, 16, 32)
    torch.testing.assert_close(tokens, _reference_tokens(kind, ref, x))
    if kind == "vjepa2":
        assert not any(n.startswith("backbone.predictor.") for n, _ in enc.named_parameters())


@pytest.mark.parametrize("kind", list(HF_STATS))
def test_hf_rebuilds_without_weights_from_its_saved_files(hf_models, kind, tmp_path):
    """The from_pretrained path: architecture + preprocessing from save_files, weights from a state dict."""
    folder, _ = hf_models[kind]
    enc = _hf(folder)
    enc.save_files(tmp_path)
    rebuilt = build_vision_encoder(enc.cfg, load_weights=False, source=str(tmp_path))
    assert (rebuilt.mean, rebuilt.std, rebuilt.native_image_size) == (enc.mean, enc.std, enc.native_image_size)
    x = _pixels(2, 3, 32, 32, seed=1)
    with torch.no_grad():
        assert not torch.allclose(rebuilt(x), enc(x))  # random init before the weights arrive
        rebuilt.load_state_dict(enc.state_dict())
        torch.testing.assert_close(rebuilt(x), enc(x))


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2", "vit"])
def test_hf_other_image_size_interpolates_positions(hf_models, kind):
    folder, _ = hf_models[kind]
    enc = build_vision_encoder(VisionConfig(kind="hf", path=str(folder), image_size=48))
    with torch.no_grad():
        assert enc(_pixels(1, 3, 48, 48)).shape == (1, 36, 32) and enc.num_tokens(48) == 36


@pytest.mark.parametrize("kind", list(HF_STATS))
def test_hf_trained_tower_has_no_unused_trainable_parameters(hf_models, kind):
    """With freeze=false every trainable tensor gets a gradient (DDP fails on unused ones);
    pooling heads off the token path stay frozen."""
    folder, _ = hf_models[kind]
    enc = _hf(folder, freeze=False)
    assert enc.training and not enc.static
    enc(_pixels(2, 3, 32, 32)).square().mean().backward()
    assert [n for n, p in _trainable(enc).items() if p.grad is None] == []
    frozen = sorted({n.split(".")[1] for n, p in enc.named_parameters() if not p.requires_grad})
    assert frozen == {"clip": ["post_layernorm"], "siglip": ["head"], "dinov2": ["embeddings"],
                      "vit": ["pooler"], "vjepa2": []}[kind]


def test_vjepa2_reads_clips_natively_in_tubelets(hf_models):
    folder, ref = hf_models["vjepa2"]
    enc = _hf(folder, num_frames=4)
    assert not hasattr(enc, "temporal_embed") and enc.num_tokens(32) == 2 * 16  # 4 frames = 2 tubelets
    clip = _pixels(2, 4, 3, 32, 32)
    with torch.no_grad():
        tokens = enc(clip)
    assert tokens.shape == (2, 32, 32)
    torch.testing.assert_close(tokens, _reference_tokens("vjepa2", ref, clip))
    with pytest.raises(ConfigError, match="num_frames=3 must be a multiple of the tubelet size 2"):
        _hf(folder, num_frames=3)


def test_hf_errors_name_the_model_and_the_fix(hf_models, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=r"cannot load vision model 'vljepa-test/not-cached'.*"
                                          r"set model.vision.path to that local folder"):
        build_vision_encoder(VisionConfig(kind="hf", path="vljepa-test/not-cached"))
    with pytest.raises(ConfigError, match="is not a folder; point it at a local model folder"):
        build_vision_encoder(VisionConfig(kind="hf", path=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match=r"kind=hf needs model.vision.path \(got 'package:efficientnet-lite0'\)"):
        build_vision_encoder(VisionConfig(kind="hf"))  # the default path is the efficientnet_lite0 weights
    with pytest.raises(ConfigError, match=r"kind=hf needs model.vision.path \(got ''\)"):
        build_vision_encoder(VisionConfig(kind="hf", path=""))
    with pytest.raises(ConfigError, match="model.vision.name='ViT-B-32' is not used by kind=hf"):
        _hf(hf_models["vit"][0], name="ViT-B-32")
    transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1]).save_pretrained(tmp_path / "resnet")
    with pytest.raises(ConfigError, match=r"\(resnet\) has no patch grid .* use kind=timm for CNNs"):
        _hf(tmp_path / "resnet")
    transformers.Siglip2VisionConfig(**TINY).save_pretrained(tmp_path / "siglip2")
    with pytest.raises(ConfigError, match="is a SigLIP 2 NaFlex tower, .* use kind=open_clip"):
        _hf(tmp_path / "siglip2")
    # Weights of a one-layer model under a two-layer config: the second layer's tensors are missing.
    import shutil

    shutil.copytree(hf_models["dinov2"][0], tmp_path / "dinov2")
    config = json.loads((tmp_path / "dinov2" / "config.json").read_text())
    (tmp_path / "dinov2" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(ConfigError, match=r"the weights in '.*dinov2' do not fit its Dinov2Model: \d+ tensors "
                                          r"missing, e.g. \['encoder.layer.1."):
        _hf(tmp_path / "dinov2")


# ------------------------------------------------------------------------------------------ video


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_video_concatenates_frames_in_time_order_with_a_temporal_embedding(hf_models, kind):
    if kind == "vit":
        cfg = VisionConfig(kind="vit", image_size=32, patch_size=16, dim=8, heads=2, depth=1, num_frames=2)
        enc, frame = build_vision_encoder(cfg), build_vision_encoder(dataclasses.replace(cfg, num_frames=1))
        frame.load_state_dict({k: v for k, v in enc.state_dict().items() if k != "temporal_embed"})
    else:
        enc, frame = _hf(hf_models[kind][0], num_frames=2), _hf(hf_models[kind][0])
    n, d = frame.num_tokens(32), frame.out_dim
    assert enc.num_tokens(32) == 2 * n and enc.temporal_embed.shape == (2, 1, d)
    clip = _pixels(3, 2, 3, 32, 32)
    with torch.no_grad():
        tokens = enc(clip)
        swapped = enc(clip.flip(1))
        first, second = frame(clip[:, 0]), frame(clip[:, 1])
    assert tokens.shape == (3, 2 * n, d)
    torch.testing.assert_close(tokens, torch.cat([first + enc.temporal_embed[0], second + enc.temporal_embed[1]], 1))
    # Frames carry their time: the same frame at another position gives other tokens.
    shift = enc.temporal_embed[0] - enc.temporal_embed[1]
    assert shift.abs().max() > 0
    torch.testing.assert_close(swapped[:, :n] - tokens[:, n:], shift.expand(3, n, d))
    with pytest.raises(ValueError, match=r"expected pixel_values \[B, 2, 3, H, W\] \(model.vision.num_frames=2\)"):
        enc(clip[:, 0])


def test_temporal_embedding_trains_whenever_the_encoder_does(hf_models):
    folder = hf_models["dinov2"][0]
    assert not _hf(folder, num_frames=2).temporal_embed.requires_grad  # static: outputs stay cacheable
    assert _hf(folder, num_frames=2, freeze=False).temporal_embed.requires_grad
    assert _hf(folder, num_frames=2, lora=LoraConfig(r=2)).temporal_embed.requires_grad
    with pytest.raises(ConfigError, match="num_frames must be >= 1"):
        _hf(folder, num_frames=0)


# ------------------------------------------------------------------------------------------ open_clip


@pytest.fixture(scope="module")
def open_clip_archs(tmp_path_factory):
    """Tiny open_clip architectures registered from JSON files, as open_clip's own configs are."""
    root = tmp_path_factory.mktemp("open_clip_configs")
    text = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
    archs = {
        "vljepa-tiny-vit": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "vljepa-tiny-timm-vit": {"image_size": 32, "timm_model_name": "test_vit", "timm_pool": "map",
                                 "timm_proj": "none"},
        "vljepa-tiny-timm-cnn": {"image_size": 32, "timm_model_name": "test_convnext", "timm_pool": "avg",
                                 "timm_proj": "linear"},
        "vljepa-tiny-resnet": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
    }
    for name, vision in archs.items():
        (root / f"{name}.json").write_text(json.dumps({"embed_dim": 16, "vision_cfg": vision, "text_cfg": text}))
    open_clip.add_model_config(root)
    return list(archs)


def _open_clip(name: str, path: str = "", **kw) -> VisionEncoder:
    return build_vision_encoder(VisionConfig(kind="open_clip", name=name, path=path, image_size=32, **kw))


def test_open_clip_checkpoint_file_gives_the_towers_own_tokens(open_clip_archs, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    clip = open_clip.create_model("vljepa-tiny-vit").eval()
    save_file(clip.state_dict(), str(tmp_path / "clip.safetensors"))
    enc = _open_clip("vljepa-tiny-vit", path=str(tmp_path / "clip.safetensors"))
    assert enc.out_dim == 32 and enc.num_tokens(32) == 16 and enc.static and not enc.training
    assert enc.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # open_clip's preprocess config
    x = _pixels(2, 3, 32, 32)
    clip.visual.output_tokens = True
    with torch.no_grad():
        tokens = enc(x)
        _, expected = clip.visual(x)  # raw tokens: after ln_post, not projected
    assert tokens.shape == (2, 16, 32)
    torch.testing.assert_close(tokens, expected)


def test_open_clip_rebuilds_without_weights_from_its_saved_files(open_clip_archs, tmp_path):
    enc = _open_clip("vljepa-tiny-vit")
    enc.save_files(tmp_path)
    rebuilt = build_vision_encoder(enc.cfg, load_weights=False, source=str(tmp_path))
    rebuilt.load_state_dict(enc.state_dict())
    assert (rebuilt.mean, rebuilt.std) == (enc.mean, enc.std)
    x = _pixels(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), enc(x))


@pytest.mark.parametrize("name, tokens, dim", [("vljepa-tiny-vit", 16, 32), ("vljepa-tiny-timm-vit", 4, 64),
                                              ("vljepa-tiny-timm-cnn", 1, 64)])
def test_open_clip_towers_give_patch_tokens_and_train_without_unused_parameters(open_clip_archs, name, tokens, dim):
    enc = _open_clip(name, freeze=False)
    out = enc(_pixels(2, 3, 32, 32))
    assert out.shape == (2, tokens, dim) and enc.num_tokens(32) == tokens
    out.square().mean().backward()
    assert [n for n, p in _trainable(enc).items() if p.grad is None] == []
    frozen = {n for n, p in enc.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("backbone.proj", "backbone.head", "backbone.trunk.")) for n in frozen)


def test_open_clip_errors_name_the_model_and_the_fix(open_clip_archs, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=r"cannot build open_clip model 'ViT-B-32' with model.vision.path="
                                          r"'laion2b_s34b_b79k'.*set model.vision.path to the checkpoint file"):
        _open_clip("ViT-B-32", path="laion2b_s34b_b79k")
    with pytest.raises(ConfigError, match=r"cannot build open_clip model 'hf-hub:vljepa-test/not-cached'.*"
                                          r"or to the downloaded repository folder"):
        _open_clip("", path="hf-hub:vljepa-test/not-cached")
    with pytest.raises(ConfigError, match=r"unknown open_clip architecture model.vision.name='ViT-B-33' "
                                          r"\(did you mean ViT-B-32"):
        _open_clip("ViT-B-33")
    with pytest.raises(ConfigError, match=r"path='laion9' is neither a file nor a pretrained tag of "
                                          r"ViT-B-32 \(tags: openai, "):
        _open_clip("ViT-B-32", path="laion9")
    with pytest.raises(ConfigError, match="kind=open_clip needs model.vision.name"):
        _open_clip("")
    with pytest.raises(ConfigError, match=r"path='package:efficientnet-lite0' names packaged weights, which only "
                                          r"kind=efficientnet_lite0 reads; with kind=open_clip set it to a pretrained"):
        build_vision_encoder(VisionConfig(kind="open_clip", name="vljepa-tiny-vit"))


def test_open_clip_mean_and_std_follow_the_pretrained_tag_without_downloading(open_clip_archs, monkeypatch, tmp_path):
    """A tag's preprocessing comes from open_clip's table, so the from_pretrained path
    (load_weights=False, nothing downloaded) normalises as the loaded model does; a bare
    checkpoint file takes what the architecture's tags agree on."""
    import huggingface_hub.constants
    from open_clip import pretrained

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    half = {"hf_hub": "vljepa-test/not-cached/", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    monkeypatch.setitem(pretrained._PRETRAINED, "vljepa-tiny-vit", {"half": half})
    with pytest.raises(ConfigError, match="with model.vision.path='half'"):
        _open_clip("vljepa-tiny-vit", path="half")  # the weights would need the Hub
    cfg = VisionConfig(kind="open_clip", name="vljepa-tiny-vit", path="half", image_size=32)
    enc = build_vision_encoder(cfg, load_weights=False)
    assert enc.mean == (0.5, 0.5, 0.5) and enc.std == (0.5, 0.5, 0.5)
    torch.save(open_clip.create_model("vljepa-tiny-vit").state_dict(), tmp_path / "clip.pt")
    assert _open_clip("vljepa-tiny-vit", path=str(tmp_path / "clip.pt")).mean == (0.5, 0.5, 0.5)


def test_open_clip_tower_without_patch_tokens_is_refused(open_clip_archs):
    with pytest.raises(ConfigError, match="'vljepa-tiny-resnet' has a ModifiedResNet vision tower without "
                                          "per-patch tokens"):
        _open_clip("vljepa-tiny-resnet")


# ------------------------------------------------------------------------------------------ LoRA


def test_lora_trains_only_the_adapters_of_a_frozen_tower(hf_models):
    folder, _ = hf_models["clip"]
    plain = _hf(folder)
    enc = _hf(folder, lora=LoraConfig(r=2, alpha=4))
    trainable = _trainable(enc)
    # q, k, v and out projections (32 -> 32) of the one layer: A [2, 32] + B [32, 2] each.
    assert sorted({n.split(".")[-4] for n in trainable}) == ["k_proj", "out_proj", "q_proj", "v_proj"]
    assert sum(p.numel() for p in trainable.values()) == 4 * (2 * 32 + 32 * 2) == 512
    assert all(".lora_" in n for n in trainable)
    assert not enc.static and not enc.training  # the frozen base stays in eval mode
    x = _pixels(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), plain(x))  # B starts at zero: the adapted tower starts as the base
    enc(x).square().mean().backward()
    assert all(p.grad is not None for p in trainable.values())
    assert any(p.grad.abs().sum() > 0 for n, p in trainable.items() if ".lora_B." in n)
    assert all(p.grad is None for p in enc.parameters() if not p.requires_grad)


def test_lora_on_open_clip_attention_changes_the_tokens(open_clip_archs):
    enc = _open_clip("vljepa-tiny-vit", lora=LoraConfig(r=2))
    names = sorted(_trainable(enc))
    assert names == [  # peft adapts MultiheadAttention's in- and out-projections together
        "backbone.transformer.resblocks.0.attn.base_layer.out_proj.lora_A.default.weight",
        "backbone.transformer.resblocks.0.attn.base_layer.out_proj.lora_B.default.weight",
        "backbone.transformer.resblocks.0.attn.lora_A.default.weight",
        "backbone.transformer.resblocks.0.attn.lora_B.default.weight",
    ]
    x = _pixels(1, 3, 32, 32)
    with torch.no_grad():
        before = enc(x)
        for n, p in enc.named_parameters():
            if ".lora_B." in n:
                p.normal_()
        assert not torch.allclose(enc(x), before)  # the adapters are on the forward path


def test_lora_on_timm_pointwise_convolutions():
    cfg = VisionConfig(kind="efficientnet_lite0", path="", image_size=32, lora=LoraConfig(r=2))
    enc = build_vision_encoder(cfg)
    convs = {n: m for n, m in enc.backbone.named_modules() if n.endswith((".conv_pw", ".conv_pwl"))}
    assert len(convs) == 31
    expected = sum(2 * m.in_features + m.out_features * 2 for m in convs.values())  # A [2, in] + B [out, 2]
    assert sum(p.numel() for p in _trainable(enc).values()) == expected
    out = enc(_pixels(1, 3, 32, 32))
    out.square().mean().backward()
    assert all(p.grad is not None for p in _trainable(enc).values())


def test_lora_errors():
    with pytest.raises(ConfigError, match=r"model.vision: kind=vit \(trained from scratch\) has no pretrained base "
                                          r"for LoRA to adapt; set model.vision.freeze=false"):
        build_vision_encoder(VisionConfig(kind="vit", image_size=32, dim=8, heads=2, depth=1, lora=LoraConfig(r=2)))
    with pytest.raises(ConfigError, match="model.vision.lora.r must be >= 0, got -1"):
        build_vision_encoder(VisionConfig(**TIMM, lora=LoraConfig(r=-1)))
    bad = VisionConfig(**TIMM, lora=LoraConfig(r=2, target_modules=["nope"]))
    with pytest.raises(ConfigError, match=r"target_modules=\['nope'\] match no linear / conv / attention layer of "
                                          r"tf_efficientnet_lite0; set it to some of: .*conv_pw"):
        build_vision_encoder(bad)


def test_lora_adapters_survive_save_pretrained_and_from_pretrained(hf_models, make_tiny_config, tmp_path):
    from vljepa.models.vljepa import VLJepa

    folder, _ = hf_models["dinov2"]
    cfg = make_tiny_config("linear", "model.vision.kind=hf", f"model.vision.path={folder}",
                           "model.vision.lora.r=2", "model.vision.lora.alpha=4")
    model = VLJepa(cfg).eval()
    with torch.no_grad():
        for n, p in model.vision.named_parameters():
            if ".lora_B." in n:
                p.normal_()  # trained adapters
    summary = model.parameter_summary()["vision"]
    assert summary["trainable"] == 4 * (2 * 32 + 32 * 2)
    # The training step reaches the adapters: a frozen tower with LoRA is not encoded under no_grad.
    tok = model.tokenize(["a red circle", "two blue stars"])
    model.train()
    model({"pixel_values": _pixels(2, 3, 32, 32), "target_ids": tok["input_ids"],
           "target_mask": tok["attention_mask"]}).loss.backward()
    model.eval()
    assert all(p.grad is not None for p in _trainable(model.vision).values())
    loaded = VLJepa.from_pretrained(model.save_pretrained(tmp_path / "model"))
    names = [n for n in loaded.state_dict() if ".lora_" in n]
    assert len(names) == 8 and names == [n for n in model.state_dict() if ".lora_" in n]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    x = _pixels(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(x), model.predict(x))


# ------------------------------------------------------------------------------------------ identity


def test_identity_names_every_setting_that_changes_the_tokens(hf_models, open_clip_archs):
    base = VisionConfig(kind="vit", image_size=32, patch_size=16, dim=8, heads=2, depth=1)
    ids = [build_vision_encoder(dataclasses.replace(base, **change)).identity()
           for change in ({}, {"image_size": 48}, {"num_frames": 2}, {"patch_size": 8})]
    assert all(a != b for i, a in enumerate(ids) for b in ids[i + 1:])
    hf = _hf(hf_models["vit"][0], lora=LoraConfig(r=2, target_modules=["q_proj"]))
    lora = {"r": 2, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj"]}
    assert hf.identity() == {"kind": "hf", "name": "", "path": str(hf_models["vit"][0]), "image_size": 32,
                             "num_frames": 1, "lora": lora}
    oc = _open_clip("vljepa-tiny-vit", num_frames=2)
    assert {k: oc.identity()[k] for k in ("kind", "name", "path", "num_frames", "lora")} == {
        "kind": "open_clip", "name": "vljepa-tiny-vit", "path": "", "num_frames": 2, "lora": None}
    timm = build_vision_encoder(VisionConfig(**TIMM, grid=2))
    assert timm.identity() == {"kind": "timm", "name": "tf_efficientnet_lite0", "path": "", "image_size": 128,
                               "num_frames": 1, "lora": None, "stage": -1, "grid": 2, "fold_stages": []}
    folded = build_vision_encoder(VisionConfig(**TIMM, grid=2, fold_stages=[-2]))
    assert folded.identity() == {**timm.identity(), "fold_stages": [-2]}
    # The weights' source is part of the identity: random and packaged EfficientNet-Lite0 differ.
    lite0 = [build_vision_encoder(VisionConfig(kind="efficientnet_lite0", path=path, image_size=32)).identity()
             for path in ("", "package:efficientnet-lite0")]
    assert lite0[0] == {**lite0[1], "path": ""} and lite0[0] != lite0[1]
    for identity in (hf.identity(), oc.identity(), timm.identity()):
        assert json.loads(json.dumps(identity)) == identity  # plain data, as cache keys need


def test_fold_stages_put_each_cells_finer_blocks_into_its_token():
    """fold_stages=[-2, -3] on EfficientNet-Lite0 at 64 px: the 2x2 grid of the deepest stage (320
    channels, reduction 32) gets, per cell, its 2x2 block of the reduction-16 map and its 4x4 block
    of the reduction-8 map, in that order."""
    torch.manual_seed(0)
    plain = build_vision_encoder(VisionConfig(**TIMM, image_size=64)).eval()
    enc = build_vision_encoder(VisionConfig(**TIMM, image_size=64, fold_stages=[-2, -3])).eval()
    enc.backbone.load_state_dict(plain.backbone.state_dict())
    assert enc.out_dim == 320 + 112 * 4 + 40 * 16 and enc.num_tokens(64) == 4
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = enc(x)
        maps = enc.backbone(x)
        base = plain(x)
    assert tokens.shape == (2, 4, enc.out_dim)
    torch.testing.assert_close(tokens[..., :320], base)
    for row in range(2):
        for col in range(2):
            token = tokens[1, row * 2 + col]
            fine16 = token[320 : 320 + 448].view(112, 2, 2)
            fine8 = token[320 + 448 :].view(40, 4, 4)
            torch.testing.assert_close(fine16, maps[-2][1, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2])
            torch.testing.assert_close(fine8, maps[-3][1, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"fold_stages": [9]}, r"fold_stages=9 is out of range: tf_efficientnet_lite0 has 5 stages"),
        ({"fold_stages": [-1]}, r"stage -1 \(reduction 32\) must be finer than feature_stage=-1"),
        ({"feature_stage": -2, "fold_stages": [-1]}, r"must be finer than feature_stage=-2 \(reduction 16\)"),
        ({"kind": "vit", "fold_stages": [-2]}, r"kind=vit has no feature pyramid: drop the option"),
    ],
)
def test_fold_stages_bad_values_are_errors_that_name_them(change, message):
    with pytest.raises(ConfigError, match=message):
        build_vision_encoder(VisionConfig(**{**TIMM, **change}))


# ------------------------------------------------------------------------------------------ timm names and weights


def test_timm_reads_a_weights_file_named_by_path(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = build_vision_encoder(VisionConfig(**TIMM, image_size=32)).eval()
    state = {k: v.clone() for k, v in source.backbone.state_dict().items()}
    save_file(state, str(tmp_path / "lite0.safetensors"))
    torch.save(state, tmp_path / "lite0.pth")
    torch.manual_seed(1)
    for file in ("lite0.safetensors", "lite0.pth"):
        enc = build_vision_encoder(VisionConfig(**{**TIMM, "path": str(tmp_path / file)}, image_size=32)).eval()
        assert enc.static and enc.identity()["path"] == str(tmp_path / file)
        for name, tensor in enc.backbone.state_dict().items():
            assert torch.equal(tensor, state[name]), (file, name)


def test_timm_and_efficientnet_lite0_name_and_path_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"kind=timm needs model.vision.name, a timm model name such as "
                                          r"tf_efficientnet_lite0"):
        build_vision_encoder(VisionConfig(kind="timm", path=""))
    with pytest.raises(ConfigError, match=r"path='package:efficientnet-lite0' names packaged weights, which only "
                                          r"kind=efficientnet_lite0 reads; kind=timm takes a weights file"):
        build_vision_encoder(VisionConfig(kind="timm", name="tf_efficientnet_lite0"))
    with pytest.raises(ConfigError, match=r"path='.*missing.pth' is not a file; give a .safetensors"):
        build_vision_encoder(VisionConfig(**{**TIMM, "path": str(tmp_path / "missing.pth")}))
    with pytest.raises(ConfigError, match=r"kind=efficientnet_lite0 is timm's tf_efficientnet_lite0; leave "
                                          r"model.vision.name empty, or use kind=timm for 'resnet18'"):
        build_vision_encoder(VisionConfig(kind="efficientnet_lite0", name="resnet18", path=""))
    with pytest.raises(ConfigError, match=r"unknown packaged vision weights model.vision.path='package:lite1'"):
        build_vision_encoder(VisionConfig(kind="efficientnet_lite0", path="package:lite1"))
    torch.save({"conv_stem.weight": torch.zeros(32, 3, 3, 3)}, tmp_path / "partial.pt")
    with pytest.raises(ConfigError, match=r"weights '.*partial.pt' miss \d+ tensors of tf_efficientnet_lite0"):
        build_vision_encoder(VisionConfig(**{**TIMM, "path": str(tmp_path / "partial.pt")}))
    torch.save({"conv_stem.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match=r"weights '.*other.pt' do not fit tf_efficientnet_lite0: size mismatch "
                                          r"for conv_stem.weight"):
        build_vision_encoder(VisionConfig(**{**TIMM, "path": str(tmp_path / "other.pt")}))


# ------------------------------------------------------------------------------------------ weights files


class _NotATensor:
    """A class torch.load(weights_only=True) refuses to unpickle."""


def test_read_state_dict_reads_safetensors_and_legacy_files(tmp_path):
    from safetensors.torch import save_file

    state = {"a.weight": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.long)}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.bin")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "checkpoint.pt")
    for name in ("w.safetensors", "w.bin", "checkpoint.pt"):
        out = read_state_dict(tmp_path / name)
        assert out.keys() == state.keys() and all(torch.equal(out[k], state[k]) for k in state), name


def test_read_state_dict_refuses_pickled_objects_and_names_the_fix(tmp_path):
    torch.save({"a.weight": torch.ones(1), "extra": _NotATensor()}, tmp_path / "pickled.pt")
    with pytest.raises(ConfigError, match=r"weights file '.*pickled.pt' is not a plain PyTorch state dict.*"
                                          r"re-save it as safetensors") as info:
        read_state_dict(tmp_path / "pickled.pt")
    assert "weights_only=False" not in str(info.value) and info.value.__cause__ is None
    assert info.value.__suppress_context__  # torch's message, which advises weights_only=False, is not shown
    torch.save({"a.weight": torch.ones(1), "step": 3}, tmp_path / "mixed.pt")
    with pytest.raises(ConfigError, match=r"'.*mixed.pt' is not a state dict \(tensor names -> tensors\)"):
        read_state_dict(tmp_path / "mixed.pt")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"'.*w.npz' is neither .safetensors nor a legacy .bin/.pt/.pth file"):
        read_state_dict(tmp_path / "w.npz")
    with pytest.raises(ConfigError, match=r"weights file '.*absent.safetensors' does not exist"):
        read_state_dict(tmp_path / "absent.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ConfigError, match=r"cannot read weights file '.*cut.safetensors'"):
        read_state_dict(tmp_path / "cut.safetensors")
