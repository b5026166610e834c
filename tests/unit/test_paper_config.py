"""The paper configuration (configs/paper): it loads, and `vljepa summary` builds it offline on the
meta device from the architectures shipped in vljepa/configs/hf, with the paper's parameter counts:
X (V-JEPA 2 ViT-L) ~304M frozen, predictor (last 8 layers of Llama-3.2-1B) ~490M trainable,
Y (EmbeddingGemma-300M) ~300M trained with lr x0.05."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import VJEPA2Model  # noqa: F401 - its modelling code loads at collection (~3 s), not in a test

from vljepa.cli import main
from vljepa.config import ConfigError, config_dir, load_config
from vljepa.hub import SHIPPED_ARCHITECTURES, architecture_only

PAPER = Path(__file__).resolve().parents[2] / "configs" / "paper"
# Exact counts of the shipped architectures (measured; the paper rounds them).
PREDICTOR_TRAINABLE = 491_820_544  # 8 x 60,821,504 (Llama-3.2-1B layers) + final norm + 1024->2048 + 2048->1536
PREDICTOR_FROZEN = 262_668_288  # the token embeddings, 128,256 x 2048
TEXT_TRAINABLE = 307_581_696  # Gemma3 text 302,863,104 + 2_Dense and 3_Dense 2 x 768 x 3072
VISION_ENCODER = 303_885_312  # V-JEPA 2 ViT-L encoder


def _summary(capsys, *overrides: str) -> dict[str, list[int]]:
    assert main(["summary", "--config", str(PAPER / "stage1.yaml"), *overrides]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["part", "trainable", "frozen"]
    return {row.split()[0]: [int(x.replace(",", "")) for x in row.split()[1:]] for row in lines[1:]}


def test_paper_stage_configs_load():
    s1 = load_config(PAPER / "stage1.yaml")
    s2 = load_config(PAPER / "stage2.yaml")
    for cfg in (s1, s2):
        m = cfg.model
        assert (m.vision.kind, m.vision.path, m.vision.freeze) == ("hf", "facebook/vjepa2-vitl-fpc64-256", True)
        assert m.vision.name == ""
        assert (m.predictor.kind, m.predictor.path, m.predictor.num_layers) == ("hf_lm", "meta-llama/Llama-3.2-1B", 8)
        assert (m.text.kind, m.text.path) == ("hf", "google/embeddinggemma-300m")
        assert m.text.freeze is False and m.text.lr_mult == 0.05
        assert m.embed_dim == 1536 and m.loss.kind == "infonce"
    assert s1.data.task == "caption" and s2.data.task == "mixed"
    assert s2.train.init_from == s1.train.output_dir + "/model"


def test_shipped_vjepa2_vitl_encoder_is_304m():
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(config_dir() / SHIPPED_ARCHITECTURES["facebook/vjepa2-vitl-fpc64-256"])
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (1024, 24, 16)
    assert (cfg.patch_size, cfg.tubelet_size, cfg.frames_per_clip, cfg.crop_size) == (16, 2, 64, 256)
    with torch.device("meta"):
        model = AutoModel.from_config(cfg)
    encoder = sum(p.numel() for p in model.encoder.parameters())
    assert encoder == VISION_ENCODER and encoder == pytest.approx(304e6, rel=0.03)


def test_summary_prints_the_paper_parameter_counts(capsys):
    rows = _summary(capsys)
    assert rows["vision"] == [0, VISION_ENCODER]  # V-JEPA 2 ViT-L, frozen (its pretraining predictor dropped)
    assert rows["predictor"] == [PREDICTOR_TRAINABLE, PREDICTOR_FROZEN]
    assert rows["text"] == [TEXT_TRAINABLE, 0]  # trained, with lr x0.05
    assert rows["target_head"] == [768 * 1536 + 1536, 0]
    assert rows["total"] == [sum(r[0] for k, r in rows.items() if k != "total"),
                             sum(r[1] for k, r in rows.items() if k != "total")]
    assert rows["vision"][1] == pytest.approx(304e6, rel=0.03)
    assert rows["predictor"][0] == pytest.approx(490e6, rel=0.03)
    assert rows["text"][0] == pytest.approx(300e6, rel=0.03)


def test_architecture_only_maps_the_paper_ids_and_refuses_other_hub_ids(tmp_path):
    model = load_config(PAPER / "stage1.yaml").model
    local = architecture_only(model)
    assert local.predictor.path == str(config_dir() / "hf/meta-llama/Llama-3.2-1B")
    assert local.text.path == str(config_dir() / "hf/google/embeddinggemma-300m")
    assert local.vision.path == str(config_dir() / "hf/facebook/vjepa2-vitl-fpc64-256")
    assert model.predictor.path == "meta-llama/Llama-3.2-1B"  # the input is not changed
    model.predictor.path = str(tmp_path)  # a local folder is kept as it is
    assert architecture_only(model).predictor.path == str(tmp_path)
    model.predictor.path = "meta-llama/Llama-3.2-3B"
    with pytest.raises(ConfigError, match=r"model.predictor.path 'meta-llama/Llama-3.2-3B' is not a local folder "
                                          r"and has no shipped architecture"):
        architecture_only(model)
    model.text.path = "BAAI/bge-small-en"
    with pytest.raises(ConfigError, match=r"model.text.path 'BAAI/bge-small-en' is not a local folder"):
        architecture_only(model)
    model.vision.path = "facebook/dinov2-base"
    with pytest.raises(ConfigError, match=r"model.vision.path 'facebook/dinov2-base' is not a local folder"):
        architecture_only(model)
