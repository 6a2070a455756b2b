"""Decoder models (one definition, family switches) and Hugging Face conversion."""

from ftjax.models.config import ModelConfig, from_config_dict
from ftjax.models.transformer import Decoder
