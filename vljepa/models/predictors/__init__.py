"""Predictors, chosen by ``model.predictor.kind`` through ``PREDICTORS``.

- ``transformer``: a bidirectional transformer trained from scratch (``transformer.py``).
- ``hf_lm``: the last layers of a pretrained causal language model, run bidirectionally (``hf_lm.py``).
"""

from __future__ import annotations

from vljepa.config import ConfigError, PredictorConfig, check_kind_keys
from vljepa.models.predictors.base import Predictor
from vljepa.models.predictors.hf_lm import HFLMPredictor
from vljepa.models.predictors.transformer import TransformerPredictor

PREDICTORS: dict[str, type[Predictor]] = {"transformer": TransformerPredictor, "hf_lm": HFLMPredictor}


def build_predictor(cfg: PredictorConfig, *, visual_dim: int, num_visual_tokens: int, target_dim: int,
                    text_vocab_size: int,
                    text_hidden_size: int | None = None, load_weights: bool = True, source: str | None = None,
                    with_tokenizer: bool = True, num_frames: int = 1) -> Predictor:
    """Build the predictor named by ``cfg.kind``.

    ``num_visual_tokens`` is what the X-encoder gives per sample; ``text_vocab_size`` and
    ``text_hidden_size`` describe the Y-encoder (its tokenizer's size, its token states' width) for
    kinds that read queries through it; ``source`` is a saved model's ``predictor/`` folder;
    ``with_tokenizer=False`` builds without a tokenizer (for counting); ``num_frames`` is the X-encoder's
    frames per clip (its tokens are that many frames' tokens in time order).
    """
    if cfg.kind not in PREDICTORS:
        raise ConfigError(f"unknown model.predictor.kind '{cfg.kind}'; choose one of {sorted(PREDICTORS)} "
                          "(transformer: trained from scratch; hf_lm: the last layers of a pretrained language "
                          "model, with model.predictor.path)")
    kind = PREDICTORS[cfg.kind]
    check_kind_keys(cfg, kind.config_keys, "model.predictor")
    return kind.from_config(cfg, visual_dim=visual_dim, num_visual_tokens=num_visual_tokens, target_dim=target_dim,
                            text_vocab_size=text_vocab_size, text_hidden_size=text_hidden_size,
                            load_weights=load_weights, source=source, with_tokenizer=with_tokenizer,
                            num_frames=num_frames)
