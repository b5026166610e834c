"""Light text decoders: shapes, generation, training to an exact fit, saving with the model, hf_lm
on tiny Llama and GPT-2 configs loaded through from_pretrained, and the caption task."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from vljepa.config import ConfigError, DecoderConfig, DecoderTrainConfig, EvalConfig
from vljepa.data.formats import DataError
from vljepa.hub import load_decoder, write_decoder
from vljepa.models.decoder import DECODERS, TextDecoder, build_decoder, caption_vocab
from vljepa.models.vljepa import VLJepa
from vljepa.train.decoder import fit_decoder, noisy

WORDS = "a an red green blue yellow purple cube ball star small large left right of to the and above below".split()
CAPTIONS = [
    "a red cube",
    "a small blue ball",
    "a green star to the left of a red ball",
    "a large yellow cube above a blue star",
    "the blue ball and the red star",
    "a red ball to the right of a small green cube",
    "an yellow star below the cube",
    "a large red cube and a small red cube",
]
TINY = DecoderConfig(dim=32, depth=1, heads=2, mlp_ratio=2.0, prefix_tokens=2, max_length=16)


def _word_tokenizer():
    """A word-level fast tokenizer over WORDS with <s> / </s> / <pad> / <unk>, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def _embeddings(n: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture(scope="module")
def tokenizer():
    return _word_tokenizer()


@pytest.fixture(scope="module")
def fitted(tokenizer):
    """A tiny transformer decoder trained (by the real training loop) to write CAPTIONS from 8 embeddings."""
    torch.manual_seed(0)
    decoder = build_decoder(TINY, embed_dim=16, tokenizer=tokenizer, vocab=caption_vocab(tokenizer, CAPTIONS))
    cfg = DecoderTrainConfig(noise_std=0.0, batch_size=8, max_steps=150, log_every=50, progress=False)
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay = 1e-2, 10, 0.0
    log = fit_decoder(decoder, CAPTIONS, _embeddings(8), cfg)
    return decoder.eval(), log


@pytest.fixture(scope="module")
def lm_folders(tmp_path_factory, tokenizer):
    """Tiny random Llama and GPT-2 causal LMs with the word tokenizer, saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    common = {"vocab_size": len(tokenizer), "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    configs = {
        "llama": LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=1,
                                              max_position_embeddings=64, **common)),
        "gpt2": GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **common)),
    }
    out = {}
    for name, lm in configs.items():
        folder = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        lm.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        out[name] = str(folder)
    return out


# --------------------------------------------------------------------------------------------
# Shapes and encoding
# --------------------------------------------------------------------------------------------


def test_registry_and_shapes(tokenizer):
    assert sorted(DECODERS) == ["hf_lm", "transformer"]
    decoder = build_decoder(TINY, embed_dim=16, tokenizer=tokenizer, vocab=caption_vocab(tokenizer, CAPTIONS))
    enc = decoder.encode_texts(CAPTIONS[:3])
    assert enc["input_ids"].shape == enc["attention_mask"].shape == (3, 12)  # longest: 10 words + BOS + EOS
    assert enc["attention_mask"].sum(1).tolist() == [5, 6, 12]
    assert enc["input_ids"][0, 0] == decoder.bos_id and enc["input_ids"][0, 4] == decoder.eos_id
    assert decoder.prefix_embeds(_embeddings(3)).shape == (3, 2, 32)
    logits = decoder(_embeddings(3), enc["input_ids"])
    assert logits.shape == (3, 12, len(decoder.vocab))
    # The decoder covers only the captions' words (+ BOS / EOS), not the tokenizer's whole vocabulary.
    assert len(decoder.vocab) == len(caption_vocab(tokenizer, CAPTIONS)) + 2 < len(tokenizer)


def test_causal_logits_do_not_see_later_tokens(tokenizer):
    decoder = build_decoder(TINY, embed_dim=16, tokenizer=tokenizer).eval()
    ids = decoder.encode_texts(["a red cube above a star", "a red cube below the ball"])["input_ids"]
    logits = decoder(_embeddings(1).expand(2, -1), ids)
    torch.testing.assert_close(logits[0, :4], logits[1, :4])  # "<s> a red cube" is shared
    assert not torch.allclose(logits[0, 5], logits[1, 5])


def test_long_captions_are_cut_to_max_length(tokenizer):
    decoder = build_decoder(DecoderConfig(dim=32, depth=1, heads=2, max_length=4), embed_dim=16, tokenizer=tokenizer)
    enc = decoder.encode_texts(["a red cube above a blue star"])
    assert enc["input_ids"].shape == (1, 4)
    assert decoder.eos_id not in enc["input_ids"][0].tolist()


def test_noisy_embeddings_stay_unit_with_noise_norms_spread_up_to_noise_std():
    e = _embeddings(4000, 256)
    assert noisy(e, 0.0) is e
    out = noisy(e, 0.3, torch.Generator().manual_seed(1))  # not _embeddings' seed
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4000))
    cos = (out * e).sum(-1)
    # |noise| = u uniform in [0, 0.3] (to within a few %): cos = 1 / sqrt(1 + u^2), whose mean is asinh(0.3) / 0.3.
    assert cos.min().item() > 1 / (1 + (0.3 * 1.2) ** 2) ** 0.5
    assert cos.max().item() > 0.9999
    assert cos.mean().item() == pytest.approx(0.98558, abs=0.002)


# --------------------------------------------------------------------------------------------
# Training and generation
# --------------------------------------------------------------------------------------------


def test_decoder_overfits_eight_captions(fitted):
    decoder, log = fitted
    assert log[-1]["step"] == 150 and log[-1]["loss"] < log[0]["loss"]
    assert decoder.generate(_embeddings(8)) == CAPTIONS
    assert decoder.generate(_embeddings(8), num_beams=3) == CAPTIONS


def test_greedy_is_the_argmax_at_every_step_and_equals_beam_one(fitted):
    decoder, _ = fitted
    e = _embeddings(8, seed=1)  # embeddings it was not trained on: a less certain decoder
    greedy = decoder.generate_ids(e, num_beams=1)
    for row, seq in enumerate(greedy):
        ids = [decoder.bos_id]
        for _ in range(decoder.cfg.max_length - 1):
            nxt = int(decoder(e[row : row + 1], torch.tensor([ids]))[0, -1].argmax())
            if nxt == decoder.eos_id:
                break
            ids.append(nxt)
        assert seq == ids[1:]


def test_batched_generation_equals_one_at_a_time(fitted):
    decoder, _ = fitted
    e = torch.cat([_embeddings(8), _embeddings(4, seed=1)])
    for beams in (1, 3):
        batched = decoder.generate(e, num_beams=beams)
        assert batched == [decoder.generate(e[i : i + 1], num_beams=beams)[0] for i in range(len(e))]
        assert decoder.generate(e, num_beams=beams, batch_size=5) == batched


def test_max_length_bounds_the_generated_tokens(fitted):
    decoder, _ = fitted
    ids = decoder.generate_ids(_embeddings(8), max_length=4)
    assert max(len(s) for s in ids) == 3  # BOS + 3 tokens; EOS never reached for the longer captions
    assert decoder.generate(_embeddings(1), max_length=4) == ["a red cube"]


class _TableDecoder(TextDecoder):
    """A decoder whose next-token log-probabilities depend only on the last token (a hand-set table)."""

    def __init__(self, tokenizer, table: dict[int, dict[int, float]]) -> None:
        super().__init__(cfg=DecoderConfig(prefix_tokens=1, max_length=5), embed_dim=4, width=4)
        self.tokenizer = tokenizer
        self._special_ids()
        self.table = table

    def token_logits(self, prefix, ids):
        out = torch.full((*ids.shape, len(self.tokenizer)), -1e4)
        for (i, j), last in zip(torch.cartesian_prod(*map(torch.arange, ids.shape)).tolist(), ids.reshape(-1).tolist()):
            for tok, p in self.table.get(last, {}).items():
                out[i, j, tok] = torch.tensor(p).log()
        return out


def test_beam_search_finds_a_better_sequence_than_greedy(tokenizer):
    bos, eos, red, blue = 1, 2, tokenizer.convert_tokens_to_ids("red"), tokenizer.convert_tokens_to_ids("blue")
    # Greedy takes "red" (0.6), then EOS (0.55): 0.33. "blue" (0.4) then EOS (0.9): 0.36.
    table = {bos: {red: 0.6, blue: 0.4}, red: {eos: 0.55, blue: 0.45}, blue: {eos: 0.9, red: 0.1}}
    decoder = _TableDecoder(tokenizer, table)
    e = torch.zeros(1, 4)
    assert decoder.generate(e, num_beams=1) == ["red"]
    assert decoder.generate(e, num_beams=2) == ["blue"]


# --------------------------------------------------------------------------------------------
# Saving with the model
# --------------------------------------------------------------------------------------------


def test_model_folder_round_trip_restores_the_decoder(tiny_model, tmp_path):
    model = copy.deepcopy(tiny_model)
    torch.manual_seed(0)
    tok = model.text.tokenizer
    model.decoder = build_decoder(TINY, embed_dim=model.config.embed_dim, tokenizer=tok,
                                  vocab=caption_vocab(tok, CAPTIONS)).eval()
    model.decoder_trained_on = "/data/train"
    e = model.encode_text(CAPTIONS).detach()
    before = model.decoder.generate(e, num_beams=2)
    model.save_pretrained(tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("decoder.")]
    loaded = VLJepa.from_pretrained(tmp_path / "m")
    assert loaded.decoder is not None and loaded.decoder_trained_on == "/data/train"
    assert loaded.decoder.generate(e, num_beams=2) == before
    for name, t in model.decoder.state_dict().items():
        assert torch.equal(t, loaded.decoder.state_dict()[name]), name
    assert "decoder" in loaded.parameter_summary()


def test_model_folder_without_decoder_loads_with_none(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    loaded = VLJepa.from_pretrained(tmp_path / "m")
    assert loaded.decoder is None and "decoder" not in loaded.parameter_summary()


def test_decoder_folder_needs_its_format(tokenizer, tmp_path):
    decoder = build_decoder(TINY, embed_dim=16, tokenizer=tokenizer)
    folder = write_decoder(decoder, tmp_path / "decoder", files={"note.txt": "x"})
    assert (folder / "note.txt").read_text() == "x"
    meta = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**meta, "format": "other"}))
    with pytest.raises(ConfigError, match="format=vljepa.decoder.*vljepa train-decoder"):
        load_decoder(folder, tokenizer=tokenizer)


# --------------------------------------------------------------------------------------------
# hf_lm on tiny configs of the real classes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hf_lm_decoder_from_pretrained_trains_generates_and_round_trips(family, lm_folders, tmp_path):
    torch.manual_seed(0)
    cfg = DecoderConfig(kind="hf_lm", path=lm_folders[family], prefix_tokens=2, max_length=8)
    decoder = build_decoder(cfg, embed_dim=16)
    assert type(decoder.lm).__name__ == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[family]
    assert (decoder.bos_id, decoder.eos_id) == (1, 2)
    enc = decoder.encode_texts(CAPTIONS[:2])
    logits = decoder(_embeddings(2), enc["input_ids"])
    assert logits.shape == (2, enc["input_ids"].shape[1], len(decoder.tokenizer))
    loss = decoder.loss(_embeddings(2), **enc)
    loss.backward()
    assert decoder.prefix[0].weight.grad is not None
    assert decoder.lm.get_input_embeddings().weight.grad is not None
    decoder.eval()
    texts = decoder.generate(_embeddings(3), num_beams=2)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    folder = write_decoder(decoder, tmp_path / "decoder")
    assert (folder / "lm" / "config.json").is_file() and (folder / "lm" / "tokenizer.json").is_file()
    loaded, _ = load_decoder(folder)
    assert loaded.generate(_embeddings(3), num_beams=2) == texts
    torch.testing.assert_close(loaded(_embeddings(2), enc["input_ids"]), decoder(_embeddings(2), enc["input_ids"]))


def test_hf_lm_freeze_lm_trains_only_the_prefix(lm_folders):
    decoder = build_decoder(DecoderConfig(kind="hf_lm", path=lm_folders["gpt2"], freeze_lm=True), embed_dim=16)
    trainable = {n.split(".")[0] for n, p in decoder.named_parameters() if p.requires_grad}
    assert trainable == {"prefix"}


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_errors_name_the_setting(tokenizer, fitted):
    with pytest.raises(ConfigError, match="unknown decoder.kind 'gru'"):
        build_decoder(DecoderConfig(kind="gru"), embed_dim=16, tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="decoder.kind=hf_lm needs decoder.path"):
        build_decoder(DecoderConfig(kind="hf_lm"), embed_dim=16)
    with pytest.raises(ConfigError, match="decoder.dim=64 is not used by decoder.kind=hf_lm"):
        build_decoder(DecoderConfig(kind="hf_lm", path="x", dim=64), embed_dim=16)
    with pytest.raises(ConfigError, match="cannot load causal language model '/no/such/lm'.*decoder.path=DIR"):
        build_decoder(DecoderConfig(kind="hf_lm", path="/no/such/lm"), embed_dim=16)
    with pytest.raises(ConfigError, match="pass the model's text tokenizer"):
        build_decoder(TINY, embed_dim=16)
    decoder, _ = fitted
    with pytest.raises(ValueError, match=r"reads embeddings \[B, 16\], got \[2, 8\]"):
        decoder.generate(torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"tokens \['purple'\] are not in this decoder's vocabulary"):
        decoder.encode_texts(["a purple cube"])
    with pytest.raises(ValueError, match="num_beams must be at least 1"):
        decoder.generate(_embeddings(1), num_beams=0)


# --------------------------------------------------------------------------------------------
# The caption task
# --------------------------------------------------------------------------------------------


def test_caption_task_without_decoder_names_train_decoder(tiny_model, tiny_world):
    from vljepa.eval.report import evaluate

    with pytest.raises(ConfigError, match="no light decoder.*vljepa train-decoder --model DIR --data"):
        evaluate(tiny_model, tiny_world.root / "test", EvalConfig(tasks=["caption"]))


def test_caption_task_reports_both_decodings(tiny_model, tiny_world):
    from vljepa.data.readers import read_split
    from vljepa.eval.report import evaluate

    model = copy.deepcopy(tiny_model)
    records, _ = read_split(tiny_world.root / "train", "caption")
    texts = list(dict.fromkeys(c for r in records for c in r.captions))
    tok = model.text.tokenizer
    torch.manual_seed(0)
    model.decoder = build_decoder(TINY, embed_dim=model.config.embed_dim, tokenizer=tok,
                                  vocab=caption_vocab(tok, texts))
    model.decoder_trained_on = str(tiny_world.root / "train")
    with pytest.raises(DataError, match="eval.caption_bank '/no/such/split' does not exist"):
        evaluate(model, tiny_world.root / "test", EvalConfig(tasks=["caption"], caption_bank="/no/such/split"))
    m = evaluate(model, tiny_world.root / "test", EvalConfig(tasks=["caption"], max_images=4))["caption"]
    assert m["n"] == 4 and m["bank_size"] == len(texts)
    assert set(m["nearest"]) == set(m["decoder"]) == {"cider", "bleu4", "rougeL"}
    assert all(ex["nearest"] in texts for ex in m["examples"])  # nearest decoding returns bank captions
    assert 0 < m["from_target"]["n"] <= 4 * 5 and 0 <= m["from_target"]["facts"] <= 1


def test_whitening_gives_the_training_targets_unit_covariance(tokenizer):
    decoder = build_decoder(TINY, embed_dim=16, tokenizer=tokenizer)
    scales = torch.logspace(0, -3, 16)  # variances spread over six orders of magnitude
    x = torch.randn(4000, 16, generator=torch.Generator().manual_seed(0)) * scales + 0.5
    decoder.set_whitening(x, eps=0.0)
    w = (x - decoder.input_mean) @ decoder.input_transform
    torch.testing.assert_close(w.T @ w / len(w), torch.eye(16), atol=1e-3, rtol=0)


def test_train_decoder_command_saves_into_the_model_folder(tiny_model, tiny_world, tmp_path, capsys):
    from vljepa.cli import main

    tiny_model.save_pretrained(tmp_path / "m")
    rc = main(["train-decoder", "--model", str(tmp_path / "m"), "--data", str(tiny_world.root / "train"),
               "decoder.dim=32", "decoder.depth=1", "decoder.heads=2", "max_steps=3", "log_every=1",
               "batch_size=8", "progress=false"])
    assert rc == 0 and "trained the decoder 3 steps" in capsys.readouterr().out
    folder = tmp_path / "m" / "decoder"
    assert [json.loads(line)["step"] for line in (folder / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert "max_steps: 3" in (folder / "train_config.yaml").read_text()
    loaded = VLJepa.from_pretrained(tmp_path / "m")
    assert loaded.decoder.cfg.dim == 32 and loaded.decoder_trained_on == str((tiny_world.root / "train").resolve())
    assert len(loaded.decoder.generate(torch.zeros(2, loaded.config.embed_dim), max_length=4)) == 2
    assert main(["train-decoder", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "none")]) == 2
    assert "none" in capsys.readouterr().err
