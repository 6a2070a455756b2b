"""Grouped-query self-attention with packing (segment ids), causal and sliding-window masks."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.models.config import ModelConfig
from ftjax.models.layers import Linear, Norm, apply_rope, constrain


def attention_mask(segment_ids: jax.Array, window: Optional[int] = None,
                   use_window=None) -> jax.Array:
  """Boolean mask [B, 1, T, T]: causal, same segment, optionally within a sliding window.

  Padding has segment id 0 and attends only to padding, so no row is ever fully masked (no NaNs);
  real tokens never see padding or another packed example. The window follows HF:
  key j is visible from query i when i - j < window. `use_window` (traced bool) lets scanned
  layers switch the window per layer (Gemma 2 alternates).
  """
  t = segment_ids.shape[1]
  idx = jnp.arange(t)
  causal = idx[:, None] >= idx[None, :]
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  mask = same & causal[None]
  if window is not None:
    in_window = (idx[:, None] - idx[None, :]) < window
    if use_window is not None:
      in_window = in_window | ~use_window
    mask = mask & in_window[None]
  return mask[:, None]


def _attend_reference(q, k, v, mask, scale, softcap):
  """Explicit attention (needed for logit soft-capping); softmax in float32. q: [B,T,N,H]."""
  b, t, n, h = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, n // kv, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    logits = jnp.tanh(logits / softcap) * softcap
  logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
  return out.reshape(b, t, n, h)


def attend(q, k, v, mask, scale: float, softcap: Optional[float], impl: Optional[str]):
  if softcap is not None:
    return _attend_reference(q, k, v, mask, scale, softcap)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, segment_ids, layer_idx):
    cfg = self.cfg
    b, t, _ = x.shape
    n, kv, h = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
    q = Linear(n * h, ("embed", "heads"), cfg, cfg.qkv_bias, name="q_proj")(x)
    k = Linear(kv * h, ("embed", "kv_heads"), cfg, cfg.qkv_bias, name="k_proj")(x)
    v = Linear(kv * h, ("embed", "kv_heads"), cfg, cfg.qkv_bias, name="v_proj")(x)
    q, k, v = q.reshape(b, t, n, h), k.reshape(b, t, kv, h), v.reshape(b, t, kv, h)
    if cfg.qk_norm:
      q = Norm(cfg, "head_dim", name="q_norm")(q)
      k = Norm(cfg, "head_dim", name="k_norm")(k)
    if cfg.pos_embedding == "rope":
      q, k = apply_rope(q, positions, cfg), apply_rope(k, positions, cfg)
    q = constrain(q, ("batch", "length", "act_heads", None))
    k = constrain(k, ("batch", "length", "act_kv_heads", None))
    v = constrain(v, ("batch", "length", "act_kv_heads", None))
    use_window = None
    if cfg.sliding_window is not None and cfg.sliding_window_pattern > 1:
      use_window = (layer_idx % cfg.sliding_window_pattern) == 0
    mask = attention_mask(segment_ids, cfg.sliding_window, use_window)
    scale = (cfg.query_pre_attn_scalar or h) ** -0.5
    out = attend(q, k, v, mask, scale, cfg.attn_logit_softcap, cfg.attention_impl)
    out = out.reshape(b, t, n * h)
    return Linear(x.shape[-1], ("heads", "embed"), cfg, cfg.o_bias, name="o_proj")(out)
