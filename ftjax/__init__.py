"""ftjax: JAX-first fine-tuning and alignment of large language models."""

__version__ = "0.1.0"
