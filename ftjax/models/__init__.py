"""Decoder models (one definition, family switches) and Hugging Face conversion."""

from ftjax.models.config import ModelConfig, from_config_dict
from ftjax.models.transformer import Decoder
from ftjax.models.hf import config_from_hf, export_hf, load_hf  # noqa: E402
