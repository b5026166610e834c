"""Y-encoders (sentence-transformers pipelines with Dense layers, open_clip text towers, LoRA) and the
hf_lm predictor (the last K layers of a causal LM, run bidirectionally), on tiny random configs of
the real transformers / open_clip classes saved to disk and read back through the library's loaders."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModel  # noqa: F401 - the modelling code loads at collection (~2 s), not in a test

try:  # the reference implementation of sentence-transformers folders (about 1.7 s to import)
    import sentence_transformers
except ImportError:
    sentence_transformers = None

from vljepa.config import ConfigError, LoraConfig, OptimConfig, PredictorConfig, TextConfig
from vljepa.models.predictors import HFLMPredictor, build_predictor
from vljepa.models.text import build_text_encoder, read_pooling
from vljepa.models.vljepa import VLJepa
from vljepa.train.optim import param_groups

WORDS = ("<unk> <pad> </s> what color is the cube ball star red blue green how many are there left of right "
         "a dog puppy car small big shape").split()


def _word_tokenizer(*, pad: bool):
    """A tiny word-level tokenizer built offline; Llama-like (no pad token) unless ``pad``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", **extra)


def _lm_config(family: str):
    from transformers import Gemma2Config, Gemma3TextConfig, GemmaConfig, LlamaConfig, Qwen2Config, Qwen3Config

    # A few spare embedding rows, as real LMs have (and transformers gives Qwen folders its own tokenizer
    # class, which adds <|endoftext|> to the word-level vocabulary).
    common = dict(vocab_size=len(WORDS) + 4, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                  num_attention_heads=2, num_key_value_heads=1)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=8)
    if family == "gemma":
        return GemmaConfig(**common, head_dim=8)
    if family == "gemma2":  # no sdpa support in transformers: runs with eager attention
        return Gemma2Config(**common, head_dim=8, sliding_window=3)
    # Gemma3 alternates sliding-window and global layers; a window of 3 makes the window matter here.
    return Gemma3TextConfig(**common, head_dim=8, sliding_window=3,
                            layer_types=["sliding_attention", "full_attention"] * 2)


FAMILIES = ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"]


class _LMFolders(dict):
    """family -> (folder of a tiny causal LM saved with save_pretrained, the source model), made on first use."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, family: str):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_lm_config(family)).eval()
        folder = self.root / family
        model.save_pretrained(folder)
        _word_tokenizer(pad=False).save_pretrained(folder)
        self[family] = (folder, model)
        return self[family]


@pytest.fixture(scope="module")
def lm_folders(tmp_path_factory):
    return _LMFolders(tmp_path_factory.mktemp("lms"))


def _ids(tok, texts):
    return tok(texts, padding=True, return_tensors="pt")


# ------------------------------------------------------------------------------------------ hf_lm predictor


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_lm_keeps_the_source_models_last_k_layers(lm_folders, family):
    folder, source = lm_folders[family]
    p = build_predictor(PredictorConfig(kind="hf_lm", path=str(folder), num_layers=2), visual_dim=12,
                        target_dim=5, text_vocab_size=0, num_visual_tokens=4)
    assert isinstance(p, HFLMPredictor) and len(p.lm.layers) == 2 and p.lm.config.num_hidden_layers == 2
    for i in range(2):
        src, dst = source.model.layers[2 + i].state_dict(), p.lm.layers[i].state_dict()
        assert src.keys() == dst.keys()
        for k in src:
            assert torch.equal(src[k], dst[k]), (i, k)
        assert p.lm.layers[i].self_attn.is_causal is False
    assert torch.equal(p.lm.embed_tokens.weight, source.model.embed_tokens.weight)
    assert torch.equal(p.lm.norm.weight, source.model.norm.weight)
    if family == "gemma3":
        assert p.lm.config.layer_types == ["sliding_attention", "full_attention"]
    # The token table is frozen; layers, final norm, visual projection and head are trained.
    assert not p.lm.embed_tokens.weight.requires_grad
    trainable = {n for n, q in p.named_parameters() if q.requires_grad}
    assert {"visual_in.weight", "head.weight", "lm.norm.weight"} <= trainable
    assert all(n.startswith(("lm.layers.", "lm.norm", "visual_in", "head")) for n in trainable)
    assert p.visual_in.out_features == 16 and p.head.out_features == 5
    with torch.no_grad():
        q = _ids(p.tokenizer, ["what color is the cube", "how many"])
        out = p(torch.randn(2, 3, 12), q["input_ids"], q["attention_mask"])
        assert out.shape == (2, 5) and p(torch.randn(2, 3, 12)).shape == (2, 5)


def _states_at_the_final_norm(p, visual, ids, mask=None):
    """Run the predictor and return the LM's per-position output states ``[B, N, H]``."""
    seen = []
    hook = p.lm.norm.register_forward_hook(lambda mod, inp, out: seen.append(out))
    try:
        with torch.no_grad():
            p(visual, ids, mask)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_lm_attention_is_bidirectional(lm_folders, family):
    folder, _ = lm_folders[family]
    p = build_predictor(PredictorConfig(kind="hf_lm", path=str(folder), num_layers=2), visual_dim=12,
                        target_dim=5, text_vocab_size=0, num_visual_tokens=4).eval()
    visual = torch.randn(1, 3, 12)
    a = torch.tensor([[3, 4, 5, 6, 7]])
    b = a.clone()
    b[0, -1] = 9  # only the last query token differs
    sa, sb = _states_at_the_final_norm(p, visual, a), _states_at_the_final_norm(p, visual, b)
    assert sa.shape == (1, 8, 16)
    # The first visual token sees the last query token: bidirectional.
    assert not torch.allclose(sa[0, 0], sb[0, 0], atol=1e-6)
    # The same layers as the causal LM they came from would not: position 0 sees only itself.
    lm = copy.deepcopy(p.lm)
    for layer in lm.layers:
        layer.self_attn.is_causal = True
    with torch.no_grad():
        embeds = [torch.cat([p.visual_in(visual), lm.embed_tokens(x)], 1) for x in (a, b)]
        causal = [lm(inputs_embeds=e, use_cache=False).last_hidden_state for e in embeds]
    torch.testing.assert_close(causal[0][0, 0], causal[1][0, 0])
    assert not torch.allclose(causal[0][0, -1], causal[1][0, -1])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_hf_lm_padding_is_masked(lm_folders, family):
    folder, _ = lm_folders[family]
    p = build_predictor(PredictorConfig(kind="hf_lm", path=str(folder), num_layers=3, max_query_len=8),
                        visual_dim=12, target_dim=5, text_vocab_size=0, num_visual_tokens=4).eval()
    visual = torch.randn(2, 3, 12)
    ids = torch.tensor([[3, 4, 5], [6, 7, 1]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with torch.no_grad():
        out = p(visual, ids, mask)
        longer = p(visual, torch.cat([ids, torch.tensor([[10, 11], [12, 13]])], 1),
                   torch.cat([mask, torch.zeros(2, 2, dtype=torch.long)], 1))
        alone = p(visual[1:], ids[1:, :2], mask[1:, :2])
        torch.testing.assert_close(longer, out, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(alone, out[1:], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(p(visual, ids, torch.zeros_like(mask)), p(visual), atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="query of 9 tokens exceeds model.predictor.max_query_len=8"):
        p(visual, torch.ones(2, 9, dtype=torch.long))


def test_hf_lm_builds_from_config_alone_on_the_meta_device(lm_folders):
    folder, _ = lm_folders["gemma3"]
    cfg = PredictorConfig(kind="hf_lm", path=str(folder), num_layers=2)
    loaded = build_predictor(cfg, visual_dim=12, target_dim=5, text_vocab_size=0, num_visual_tokens=4)
    with torch.device("meta"):
        meta = build_predictor(cfg, visual_dim=12, target_dim=5, text_vocab_size=0, num_visual_tokens=4, load_weights=False,
                               with_tokenizer=False)
    assert meta.tokenizer is None and meta.lm.embed_tokens.weight.is_meta
    assert [(n, q.shape, q.requires_grad) for n, q in meta.named_parameters()] == \
        [(n, q.shape, q.requires_grad) for n, q in loaded.named_parameters()]
    assert meta.lm.config.layer_types == loaded.lm.config.layer_types


def test_hf_lm_errors(lm_folders, monkeypatch):
    import huggingface_hub.constants

    folder, _ = lm_folders["llama"]
    with pytest.raises(ConfigError, match=r"num_layers=5 must be between 1 and the 4 layers of"):
        build_predictor(PredictorConfig(kind="hf_lm", path=str(folder), num_layers=5), visual_dim=4, target_dim=4,
                        text_vocab_size=0, num_visual_tokens=4)
    with pytest.raises(ConfigError, match="kind=hf_lm needs model.predictor.path"):
        build_predictor(PredictorConfig(kind="hf_lm"), visual_dim=4, target_dim=4, text_vocab_size=0, num_visual_tokens=4)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, without retries
    with pytest.raises(ConfigError, match=r"cannot load language model 'nobody/no-such-lm' .*"
                                          r"hf download nobody/no-such-lm --local-dir DIR.*model.predictor.path=DIR"):
        build_predictor(PredictorConfig(kind="hf_lm", path="nobody/no-such-lm"), visual_dim=4, target_dim=4,
                        text_vocab_size=0, num_visual_tokens=4)
    with pytest.raises(ConfigError, match=r"choose one of \['hf_lm', 'transformer'\]"):
        build_predictor(PredictorConfig(kind="lstm"), visual_dim=4, target_dim=4, text_vocab_size=0, num_visual_tokens=4)


@pytest.fixture(scope="module")
def lm_vljepa(lm_folders, make_tiny_config):
    """A tiny VLJepa whose predictor is the last 2 layers of the tiny Llama (Y = real MiniLM)."""
    folder, _ = lm_folders["llama"]
    torch.manual_seed(0)
    cfg = make_tiny_config("linear", "model.predictor.kind=hf_lm", f"model.predictor.path={folder}",
                           "model.predictor.num_layers=2")
    cfg.predictor = PredictorConfig(kind="hf_lm", path=str(folder), num_layers=2)  # no built-in transformer keys
    return VLJepa(cfg).eval()


def test_vljepa_queries_use_the_language_models_tokenizer(lm_vljepa):
    m = lm_vljepa
    q = m.tokenize_queries(["what color is the star", "", "how many"])
    own = _word_tokenizer(pad=False)
    assert q["query_ids"][0].tolist() == own("what color is the star")["input_ids"]
    assert q["query_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert int(q["query_ids"].max()) < len(WORDS)  # the LM's ids, not MiniLM's (30522 entries)
    # Targets still go through the Y-encoder's tokenizer.
    assert m.tokenize(["a dog"])["input_ids"][0].tolist() == m.text.tokenizer("a dog")["input_ids"]


def test_vljepa_with_hf_lm_trains_the_layers_and_round_trips(lm_vljepa, tmp_path):
    m = copy.deepcopy(lm_vljepa).train()
    tok = m.tokenize(["a red ball", "two blue stars"])
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "target_ids": tok["input_ids"],
             "target_mask": tok["attention_mask"], **m.tokenize_queries(["what color is the ball", "how many"])}
    m(batch).loss.backward()
    assert m.predictor.lm.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert m.predictor.visual_in.weight.grad.abs().sum() > 0
    assert m.predictor.lm.embed_tokens.weight.grad is None
    m.eval()
    folder = m.save_pretrained(tmp_path / "model")
    assert (folder / "predictor" / "config.json").is_file()
    assert json.loads((folder / "predictor" / "config.json").read_text())["num_hidden_layers"] == 2
    loaded = VLJepa.from_pretrained(folder)
    q = loaded.tokenize_queries(["is the cube red", "how many"])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(pixels, **q), m.predict(pixels, **q))
    for (name, a), (_, b) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------------ LoRA on Y


@pytest.fixture(scope="module")
def lora_model(make_tiny_config):
    torch.manual_seed(0)
    return VLJepa(make_tiny_config("linear", "model.text.lora.r=4", "model.text.lora.alpha=8")).eval()


def test_lora_on_a_frozen_y_counts_and_trains_only_the_adapters(lora_model, tiny_model):
    m = copy.deepcopy(lora_model)
    text = m.parameter_summary()["text"]
    # all-MiniLM-L6-v2: 6 layers x (query, key, value) x r (384 + 384)
    assert text["trainable"] == 6 * 3 * 4 * (384 + 384) == 55_296
    assert text["frozen"] == tiny_model.parameter_summary()["text"]["frozen"] == 22_713_216
    assert all("lora_" in n for n, p in m.text.named_parameters() if p.requires_grad)
    assert not m.text.static and tiny_model.text.static
    m.train()
    # The frozen base stays in eval mode (no dropout); the adapters' dropout follows the mode.
    assert not m.text.model.training and not m.text.model.encoder.layer[0].attention.self.dropout.training
    assert all(mod.lora_dropout.training for mod in m.text.modules() if hasattr(mod, "lora_dropout"))
    tok = m.tokenize(["a red circle", "a blue star"])
    out = m({"pixel_values": torch.randn(2, 3, 32, 32), "target_ids": tok["input_ids"],
             "target_mask": tok["attention_mask"]})
    out.loss.backward()
    grads = {n: p.grad for n, p in m.text.named_parameters()}
    assert all(g is None for n, g in grads.items() if "lora_" not in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    # The trainer passes text_lr_mult=0.0 for a frozen base; the adapters still get text.lr_mult (0.05).
    groups = param_groups(m, OptimConfig(lr=0.01), text_lr_mult=0.0)
    lora = {id(p) for n, p in m.named_parameters() if "lora_" in n}
    lrs = [g["lr"] for g in groups if any(id(p) in lora for p in g["params"])]
    assert lrs and all(lr == pytest.approx(0.01 * 0.05) for lr in lrs)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in m.parameters() if p.requires_grad)


def test_lora_y_with_fresh_adapters_is_minilm_and_ranks_a_puppy_near_a_dog(lora_model, tiny_model):
    texts = ["a dog", "a puppy", "a car"]
    with torch.no_grad():
        z = lora_model.text(**lora_model.tokenize(texts)).pooled
        base = tiny_model.text(**tiny_model.tokenize(texts)).pooled
    torch.testing.assert_close(z, base)  # lora_B starts at zero: the adapters change nothing yet
    dog, puppy, car = z
    assert puppy @ dog > puppy @ car + 0.1


def test_lora_y_round_trips_through_save_and_load(lora_model, tmp_path):
    m = copy.deepcopy(lora_model)
    with torch.no_grad():
        for n, p in m.text.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    folder = m.save_pretrained(tmp_path / "model")
    loaded = VLJepa.from_pretrained(folder)
    assert loaded.parameter_summary() == m.parameter_summary()
    for (name, a), (_, b) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    texts = ["a red circle", "yes", "three small squares"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(texts), m.encode_text(texts))
        assert not torch.allclose(m.encode_text(texts), lora_model.encode_text(texts))  # the adapters act


# ------------------------------------------------------------------------------------------ sentence-transformers


@pytest.fixture(scope="module")
def gemma_st_folder(tmp_path_factory):
    """An EmbeddingGemma-shaped folder: bidirectional Gemma3 + mean pooling + 2 Dense layers + Normalize."""
    from safetensors.torch import save_file
    from transformers import AutoModel, Gemma3TextConfig

    folder = tmp_path_factory.mktemp("embeddinggemma_tiny")
    torch.manual_seed(1)
    cfg = Gemma3TextConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"], use_bidirectional_attention=True,
                           pad_token_id=1)
    AutoModel.from_config(cfg).save_pretrained(folder)
    _word_tokenizer(pad=True).save_pretrained(folder)
    modules = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Dense", "Dense"), ("3_Dense", "Dense"),
               ("4_Normalize", "Normalize")]
    (folder / "modules.json").write_text(json.dumps(
        [{"idx": i, "name": str(i), "path": p, "type": f"sentence_transformers.models.{t}"}
         for i, (p, t) in enumerate(modules)]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 16, "pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}))
    # 2_Dense in safetensors without bias (as EmbeddingGemma), 3_Dense as a legacy .bin with bias and Tanh.
    (folder / "2_Dense").mkdir()
    (folder / "2_Dense" / "config.json").write_text(json.dumps(
        {"in_features": 16, "out_features": 48, "bias": False,
         "activation_function": "torch.nn.modules.linear.Identity"}))
    save_file({"linear.weight": torch.randn(48, 16) * 0.2}, str(folder / "2_Dense" / "model.safetensors"))
    (folder / "3_Dense").mkdir()
    (folder / "3_Dense" / "config.json").write_text(json.dumps(
        {"in_features": 48, "out_features": 16, "bias": True,
         "activation_function": "torch.nn.modules.activation.Tanh"}))
    torch.save({"linear.weight": torch.randn(16, 48) * 0.2, "linear.bias": torch.randn(16) * 0.1},
               folder / "3_Dense" / "pytorch_model.bin")
    return folder


def _manual_st_embedding(folder: Path, texts: list[str]) -> torch.Tensor:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = AutoModel.from_pretrained(folder).eval()(**tok).last_hidden_state
        m = tok["attention_mask"].unsqueeze(-1).float()
        x = (states * m).sum(1) / m.sum(1)
        x = x @ load_file(str(folder / "2_Dense" / "model.safetensors"))["linear.weight"].T
        d3 = torch.load(folder / "3_Dense" / "pytorch_model.bin", weights_only=True)
        x = torch.tanh(x @ d3["linear.weight"].T + d3["linear.bias"])
    return torch.nn.functional.normalize(x, dim=-1)


def test_sentence_transformers_folder_follows_modules_json(gemma_st_folder, tmp_path):
    texts = ["a red ball", "how many small shape are there", "the cube"]
    enc = build_text_encoder(TextConfig(path=str(gemma_st_folder))).eval()
    assert enc.pooling == "mean" and len(enc.dense) == 2
    assert enc.hidden_size == 16 and enc.pooled_size == 16 and enc.vocab_size == len(WORDS)
    assert [type(d.activation) for d in enc.dense] == [nn.Identity, nn.Tanh] and enc.dense[0].linear.bias is None
    with torch.no_grad():
        out = enc(**enc.tokenize(texts))
    assert out.states.shape[:2] == out.mask.shape and out.states.shape[-1] == 16
    torch.testing.assert_close(out.pooled, _manual_st_embedding(gemma_st_folder, texts), atol=1e-5, rtol=1e-4)
    # Written back by save_files, the pipeline rebuilds from config alone and takes the same weights.
    enc.save_files(tmp_path / "text_encoder")
    assert [m["path"] for m in json.loads((tmp_path / "text_encoder" / "modules.json").read_text())] == \
        ["", "1_Pooling", "2_Dense", "3_Dense"]
    rebuilt = build_text_encoder(TextConfig(path="unused"), load_weights=False, source=str(tmp_path / "text_encoder"))
    rebuilt.load_state_dict(enc.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(**rebuilt.tokenize(texts)).pooled, out.pooled)


@pytest.mark.skipif(sentence_transformers is None, reason="sentence-transformers is not installed")
def test_sentence_transformers_folder_matches_the_sentence_transformers_library(gemma_st_folder):
    texts = ["a red ball", "left of the blue star"]
    enc = build_text_encoder(TextConfig(path=str(gemma_st_folder))).eval()
    ref = sentence_transformers.SentenceTransformer(str(gemma_st_folder), device="cpu")
    with torch.no_grad():
        ours = enc(**enc.tokenize(texts)).pooled
    theirs = torch.as_tensor(ref.encode(texts))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_sentence_transformers_folder_errors(gemma_st_folder, tmp_path):
    import shutil

    folder = tmp_path / "st"
    shutil.copytree(gemma_st_folder, folder)
    (folder / "3_Dense" / "pytorch_model.bin").unlink()
    with pytest.raises(ConfigError, match=r"Dense module '.*3_Dense' has no model.safetensors or pytorch_model.bin"):
        build_text_encoder(TextConfig(path=str(folder)))
    modules = json.loads((folder / "modules.json").read_text())
    modules[1]["type"] = "sentence_transformers.models.WeightedLayerPooling"
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConfigError, match="uses a sentence_transformers.models.WeightedLayerPooling module"):
        build_text_encoder(TextConfig(path=str(folder)))
    # The pooling file of sentence-transformers >= 5 names the mode instead of one flag per mode.
    (tmp_path / "new" / "1_Pooling").mkdir(parents=True)
    (tmp_path / "new" / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "lasttoken"}))
    assert read_pooling(tmp_path / "new") == "last"


# ------------------------------------------------------------------------------------------ open_clip text tower

TINY_CLIP = "vljepa-tiny-clip"


@pytest.fixture(scope="module")
def tiny_clip_checkpoint(tmp_path_factory):
    """A tiny open_clip CLIP registered under TINY_CLIP, and a 'pretrained' checkpoint file of it."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip")
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps({
        "embed_dim": 24,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }))
    open_clip.add_model_config(folder / f"{TINY_CLIP}.json")
    torch.manual_seed(2)
    clip = open_clip.create_model(TINY_CLIP).eval()  # the plain CLIP class (text tower at the top level)
    torch.save(clip.state_dict(), folder / "tiny_clip.pt")
    return folder / "tiny_clip.pt", clip


def test_open_clip_text_tower_gives_the_models_text_embedding(tiny_clip_checkpoint):
    import open_clip

    path, clip = tiny_clip_checkpoint
    enc = build_text_encoder(TextConfig(kind="open_clip", name=TINY_CLIP, path=str(path)))
    assert enc.static and not enc.training and all(not p.requires_grad for p in enc.parameters())
    assert enc.pooled_size == 24 and enc.hidden_size == 32 and enc.vocab_size == 49408
    texts = ["a red cube", "two small blue balls on the left"]
    tok = enc.tokenize(texts)
    ids = open_clip.get_tokenizer(TINY_CLIP)(texts)
    assert torch.equal(tok["input_ids"], ids)
    assert tok["attention_mask"].sum(1).tolist() == [5, 9]  # <start> words <end>
    with torch.no_grad():
        out = enc(**tok)
        torch.testing.assert_close(out.pooled, clip.encode_text(ids, normalize=True))
    assert out.states.shape == (2, 77, 32)


def test_open_clip_text_in_vljepa_token_head_and_round_trip(tiny_clip_checkpoint, make_tiny_config, tmp_path):
    path, _ = tiny_clip_checkpoint
    cfg = make_tiny_config("token", "model.text.kind=open_clip", f"model.text.name={TINY_CLIP}",
                           f"model.text.path={path}", "model.text.lora.r=2")
    m = VLJepa(cfg).eval()
    s = m.parameter_summary()["text"]
    assert s["trainable"] > 0 and all("lora_" in n for n, p in m.text.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for n, p in m.text.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    loaded = VLJepa.from_pretrained(m.save_pretrained(tmp_path / "model"))
    texts = ["a red cube", "yes"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(texts), m.encode_text(texts))
    with pytest.raises(ConfigError, match="needs model.text.name"):
        build_text_encoder(TextConfig(kind="open_clip", path=""))
    with pytest.raises(ConfigError, match="is a Hugging Face text model; with kind=open_clip set model.text.name"):
        build_text_encoder(TextConfig(kind="open_clip", name=TINY_CLIP))


def test_text_hub_id_offline_names_the_model_and_the_fix(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=r"cannot fetch text model 'nobody/no-such-embedder-v1.5' .*hf download "
                                          r"nobody/no-such-embedder-v1.5 --local-dir DIR.*model.text.path=DIR"):
        build_text_encoder(TextConfig(path="nobody/no-such-embedder-v1.5"))


def test_text_registry_and_lora_target_errors(gemma_st_folder):
    with pytest.raises(ConfigError, match=r"unknown model.text.kind 'bert'; choose one of \['hf', 'open_clip'\]"):
        build_text_encoder(TextConfig(kind="bert"))
    bad = TextConfig(path=str(gemma_st_folder), lora=LoraConfig(r=2, target_modules=["nope"]))
    with pytest.raises(ConfigError, match=r"model.text.lora.target_modules=\['nope'\] match no linear / conv / "
                                          r"attention layer of .*embeddinggemma_tiny.*; set it to some of: .*q_proj"):
        build_text_encoder(bad)
    with pytest.raises(ConfigError, match="model.text.lora.r must be >= 0, got -1"):
        build_text_encoder(TextConfig(path=str(gemma_st_folder), lora=LoraConfig(r=-1)))


def test_text_freeze_and_lora_follow_the_x_encoders_policy(gemma_st_folder):
    """LoRA adapts the attention projections of the transformer and trains nothing else (Dense layers
    included), keeping the base in eval mode; freeze=false without LoRA trains every parameter."""
    enc = build_text_encoder(TextConfig(path=str(gemma_st_folder), lora=LoraConfig(r=2)))
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and n.startswith("model.layers.") for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not enc.static and not enc.model.training
    full = build_text_encoder(TextConfig(path=str(gemma_st_folder), freeze=False))
    assert not full.static and full.training and all(p.requires_grad for p in full.parameters())
    assert any(n.startswith("dense.") for n, _ in full.named_parameters())


@pytest.mark.parametrize("key,value", [("query_tokens", "text"), ("mlp", "swiglu"), ("pool", "query"), ("dim", 64),
                                       ("max_visual_tokens", 16)])
def test_hf_lm_refuses_options_of_the_built_in_transformer(lm_folders, key, value):
    """Set on kind=hf_lm, a transformer-only option would be silently ignored: it is an error naming it."""
    folder, _ = next(iter(lm_folders.values()))
    cfg = PredictorConfig(kind="hf_lm", path=str(folder), num_layers=2, **{key: value})
    with pytest.raises(ConfigError, match=f"model.predictor.{key}={value} is not used by model.predictor.kind=hf_lm"):
        build_predictor(cfg, visual_dim=12, target_dim=8, text_vocab_size=0, num_visual_tokens=4)
