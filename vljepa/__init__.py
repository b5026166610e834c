"""vljepa: vision-language Joint Embedding Predictive Architectures.

Train, evaluate and share VL-JEPA models: a vision encoder turns images into tokens, a predictor
reads them with a text query and predicts the embedding of the answer, and a frozen text encoder
defines the target space.
"""

from vljepa.config import ConfigError, ModelConfig, RunConfig, load_config
from vljepa.data.formats import DataError
from vljepa.decode.nearest import CandidateBank
from vljepa.models.vljepa import VLJepa, VLJepaOutput

__version__ = "0.1.0"

__all__ = ["CandidateBank", "ConfigError", "DataError", "ModelConfig", "RunConfig", "VLJepa", "VLJepaOutput",
           "load_config", "__version__"]
