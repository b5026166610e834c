"""The real pretrained towers that ship on PyPI: ImageNet EfficientNet-Lite0 (X) and
all-MiniLM-L6-v2 (Y), and the registries' errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vljepa.config import ConfigError, TextConfig, VisionConfig
from vljepa.models.text import build_text_encoder, read_pooling, resolve_text_path
from vljepa.models.vision import build_vision_encoder, efficientnet_lite0_state_dict

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
    enc = build_vision_encoder(VisionConfig(kind="efficientnet_lite0", path="package:efficientnet-lite0",
                                            image_size=64))
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
        build_vision_encoder(VisionConfig(kind="timm", name="tf_efficientnet_lite0", path="", feature_stage=7))
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
    assert minilm.pooling == "mean" and minilm.pooled_size == 384 and minilm.hidden_size == 384
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
