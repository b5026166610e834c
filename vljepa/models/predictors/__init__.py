"""Predictors, chosen by ``model.predictor.kind`` through ``PREDICTORS``.

- ``transformer``: a bidirectional transformer trained from scratch (``transformer.py``).
- ``hf_lm``: the last layers of a pretrained causal language model, run bidirectionally (``hf_lm.py``).
"""

from __future__ import annotations

from vljepa.config import ConfigError, PredictorConfig
from vljepa.models.predictors.base import Predictor
from vljepa.models.predictors.hf_lm import HFLMPredictor
from vljepa.models.predictors.transformer import TransformerPredictor

PREDICTORS: dict[str, type[Predictor]] = {"transformer": TransformerPredictor, "hf_lm": HFLMPredictor}


def build_predictor(cfg: PredictorConfig, *, visual_dim: int, num_visual_tokens: int, target_dim: int,
                    text_vocab_size: int,
                    text_hidden_size: int | None = None, load_weights: bool = True, source: str | None = None,
                    with_tokenizer: bool = True) -> Predictor:
    """Build the predictor named by ``cfg.kind``.

    ``num_visual_tokens`` is what the X-encoder gives per sample; ``text_vocab_size`` and
    ``text_hidden_size`` describe the Y-encoder (its tokenizer's size, its token states' width) for
    kinds that read queries through it; ``source`` is a saved model's ``predictor/`` folder;
    ``with_tokenizer=False`` builds without a tokenizer (for counting).
    """
    if cfg.kind not in PREDICTORS:
        raise ConfigError(f"unknown model.predictor.kind '{cfg.kind}'; choose one of {sorted(PREDICTORS)} "
                          "(transformer: trained from scratch; hf_lm: the last layers of a pretrained language "
                          "model, with model.predictor.path)")
    kind = PREDICTORS[cfg.kind]
    defaults = PredictorConfig()
    for key in vars(defaults):
        if key != "kind" and key not in kind.config_keys and getattr(cfg, key) != getattr(defaults, key):
            # Set on a kind that does not read it, the value would be silently ignored.
            raise ConfigError(f"model.predictor.{key}={getattr(cfg, key)} is not used by model.predictor.kind="
                              f"{cfg.kind} (it reads {', '.join(kind.config_keys)}); leave it at "
                              f"{getattr(defaults, key)!r}")
    return kind.from_config(cfg, visual_dim=visual_dim, num_visual_tokens=num_visual_tokens, target_dim=target_dim,
                            text_vocab_size=text_vocab_size, text_hidden_size=text_hidden_size,
                            load_weights=load_weights, source=source, with_tokenizer=with_tokenizer)
