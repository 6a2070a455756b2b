"""Tiny random-weight HF checkpoints and reference logits, for parity tests (torch CPU).

    path = save_tiny("llama", tmp_path / "llama")            # config + safetensors on disk
    cfg, params = hf.load_hf(path)
    ref = hf_logits(path, tokens, mask)                       # transformers' float32 logits

Everything is offline: models come from HF config classes with `from_config` and
`save_pretrained`; no hub access.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import numpy as np

# Small but not degenerate: GQA (4 heads over 2 kv heads), head_dim 16, 2 layers, vocab 128.
_LLAMA_LIKE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=64, initializer_range=0.1)

TINY: Dict[str, Dict[str, Any]] = {
    "llama": dict(_LLAMA_LIKE),
    "mistral": dict(_LLAMA_LIKE, sliding_window=4),
    "qwen2": dict(_LLAMA_LIKE),
    "qwen3": dict(_LLAMA_LIKE),
    "gemma": dict(_LLAMA_LIKE),
    "gemma2": dict(_LLAMA_LIKE, sliding_window=4, query_pre_attn_scalar=24,
                   attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    "gpt2": dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                 initializer_range=0.1),
}


def hf_config(family: str, **overrides):
  import transformers  # pylint: disable=g-import-not-at-top
  kw = dict(TINY[family], **overrides)
  return transformers.AutoConfig.for_model(family, **kw)


def save_tiny(family: str, out_dir, seed: int = 0, dtype: Optional[str] = None,
              tokenizer=None, max_shard_size=None, **overrides) -> str:
  """Writes a random-weight tiny `family` model (and tokenizer, if given) to out_dir."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **overrides))
  with torch.no_grad():  # norm weights start at 1 (or 0 for Gemma): randomise to test them
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  if dtype is not None:
    model = model.to(getattr(torch, dtype))
  out_dir = os.fspath(out_dir)
  kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(out_dir, **kw)
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)
  return out_dir


def padding_batch(vocab: int, batch: int = 3, length: int = 12, seed: int = 0):
  """tokens [B, T] and attention mask [B, T]: row 0 full, row 1 right-padded, row 2 left-padded."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  if batch > 1:
    mask[1, length - 4:] = 0
  if batch > 2:
    mask[2, :5] = 0
  return tokens, mask


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
  """HF-style positions for padded batches: cumsum(mask) - 1, clipped at 0."""
  return np.clip(np.cumsum(mask, axis=-1) - 1, 0, None).astype(np.int32)


def torch_causal_lm(path, dtype: str = "float32"):
  """transformers.AutoModelForCausalLM from a local dir, in `dtype`."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.AutoModelForCausalLM.from_pretrained(os.fspath(path),
                                                           dtype=getattr(torch, dtype))


def assert_close_on_real(a, b, atol: float = 1e-4):
  """Logits of `padding_batch` (default shape) compared at real (mask == 1) positions only:
  padding rows differ by convention."""
  _, mask = padding_batch(a.shape[-1])
  np.testing.assert_allclose(a[mask == 1], b[mask == 1], atol=atol)


def hf_logits(path, tokens, mask=None, dtype: str = "float32", model=None) -> np.ndarray:
  """transformers' logits [B, T, V] (float32 numpy) with explicit position ids from the mask."""
  import torch  # pylint: disable=g-import-not-at-top
  if model is None:
    model = torch_causal_lm(path, dtype)
  model.eval()
  mask = np.ones_like(tokens) if mask is None else mask
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(np.asarray(tokens, np.int64)),
                attention_mask=torch.as_tensor(np.asarray(mask, np.int64)),
                position_ids=torch.as_tensor(positions_from_mask(mask).astype(np.int64)))
  return out.logits.float().numpy()


def ftjax_logits(cfg, params, tokens, mask=None) -> np.ndarray:
  """ftjax logits with the padding convention: segment_ids = mask, positions from the mask."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ftjax.models.transformer import Decoder  # pylint: disable=g-import-not-at-top
  mask = np.ones_like(tokens) if mask is None else mask
  out = Decoder(cfg).apply({"params": params}, jnp.asarray(tokens),
                           positions=jnp.asarray(positions_from_mask(mask)),
                           segment_ids=jnp.asarray(mask, jnp.int32))
  return np.asarray(out, np.float32)
