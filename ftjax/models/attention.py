"""Grouped-query self-attention with packing (segment ids), causal and sliding-window masks."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.models import flash_cpu
from ftjax.models.config import ModelConfig
from ftjax.models.flash import flash_attention, visible
from ftjax.models.layers import Linear, Norm, apply_rope, constrain


def attention_mask(segment_ids: jax.Array, window: Optional[int] = None,
                   use_window=None) -> jax.Array:
  """Boolean mask [B, 1, T, T]: causal, same segment, optionally within a sliding window.

  Padding has segment id 0 and attends only to padding, so no row is ever fully masked (no NaNs);
  real tokens never see padding or another packed example. The window follows HF:
  key j is visible from query i when i - j < window. `use_window` (traced bool) lets scanned
  layers switch the window per layer (Gemma 2 alternates).
  """
  idx = jnp.arange(segment_ids.shape[1])
  return visible(idx[:, None], idx[None, :], segment_ids[:, :, None], segment_ids[:, None, :],
                 window, use_window)[:, None]


def _attend_explicit(q, k, v, mask, scale, softcap):
  """Attention in a heads-major layout with an additive mask; logits and softmax in float32.

  q: [B, T, N, H]; k, v: [B, S, K, H]; mask: [B, 1, T, S] bool. Heads-major operands make both
  einsums plain batched matmuls and the additive mask keeps no broadcast constant alive for the
  backward pass: on XLA:CPU this is ~1.3x faster than jax.nn.dot_product_attention's XLA path,
  and it is the only path with logit soft-capping (Gemma 2).
  """
  b, t, n, h = q.shape
  kv = k.shape[2]
  qh = q.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
  logits = jnp.einsum("bkgth,bksh->bkgts", qh, kh, preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    logits = jnp.tanh(logits / softcap) * softcap
  bias = jnp.where(mask, 0.0, -1e30).astype(jnp.float32)[:, :, None]  # [B, 1, 1, T, S]
  probs = jax.nn.softmax(logits + bias, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bksh->bkgth", probs, vh)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def attend(q, k, v, segment_ids, scale: float, softcap: Optional[float], impl: Optional[str],
           window: Optional[int] = None, use_window=None):
  """Causal self-attention over packed segments; q [B,T,N,H], k/v [B,T,K,H] -> [B,T,N,H].

  impl: None = auto (jax.nn.dot_product_attention on GPU, which picks cuDNN when it can; on CPU
  the native kernel when it applies, else the blockwise `flash` path; the explicit path on TPU,
  where it has not been measured yet), 'native' = ftjax.models.flash_cpu (AVX2 C++ kernel through
  the XLA FFI: float32, one CPU device, head dim % 16 == 0), 'flash' = ftjax.models.flash (causal
  blocks in XLA, hand-written backward), 'xla' = one explicit masked softmax, 'cudnn' / 'jax' =
  jax.nn's kernels. Logit soft-capping (Gemma 2) always takes the explicit path.
  """
  if impl is None:
    backend = jax.default_backend()
    impl = {"gpu": "jax", "cpu": "native" if flash_cpu.supports(q, k, v) else "flash"}.get(
        backend, "xla")
  if impl not in ("flash", "xla", "cudnn", "jax", "native"):
    raise ValueError(
        f"model.attention_impl: unknown {impl!r} (None | native | flash | xla | cudnn | jax)")
  if impl == "native" and softcap is None:
    if not flash_cpu.supports(q, k, v):
      raise ValueError(
          "model.attention_impl='native' needs float32 q/k/v on a single CPU device with head dim "
          f"% 16 == 0 and the kernel built (here: dtype {q.dtype}, head dim {q.shape[-1]}, "
          f"{jax.device_count()} {jax.default_backend()} device(s); kernel: "
          f"{flash_cpu.unavailable_reason() or 'ok'})")
    return flash_cpu.flash_attention_native(q, k, v, segment_ids, scale, window, use_window)
  if impl == "flash" and softcap is None:
    return flash_attention(q, k, v, segment_ids, scale, window, use_window)
  if segment_ids is None:
    segment_ids = jnp.ones(q.shape[:2], jnp.int32)
  mask = attention_mask(segment_ids, window, use_window)
  if impl in ("xla", "flash", "native") or softcap is not None:
    return _attend_explicit(q, k, v, mask, scale, softcap)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                      implementation="cudnn" if impl == "cudnn" else None)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, rope, segment_ids, layer_idx):
    """x [B, T, D]; rope: `layers.rope_tables` (None without rotary embeddings)."""
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
    if rope is not None:
      q, k = apply_rope(q, rope), apply_rope(k, rope)
    q = constrain(q, ("batch", "length", "act_heads", None))
    k = constrain(k, ("batch", "length", "act_kv_heads", None))
    v = constrain(v, ("batch", "length", "act_kv_heads", None))
    use_window = None
    if cfg.sliding_window is not None and cfg.sliding_window_pattern > 1:
      use_window = (layer_idx % cfg.sliding_window_pattern) == 0
    scale = (cfg.query_pre_attn_scalar or h) ** -0.5
    if cfg.decode_cache:
      out = self._cached(q, k, v, segment_ids, scale, use_window)
    else:
      out = attend(q, k, v, segment_ids, scale, cfg.attn_logit_softcap, cfg.attention_impl,
                   cfg.sliding_window, use_window)
    out = out.reshape(b, t, n * h)
    return Linear(x.shape[-1], ("heads", "embed"), cfg, cfg.o_bias, name="o_proj")(out)

  def _cached(self, q, k, v, segment_ids, scale, use_window):
    """Incremental decoding: append this call's t keys/values at the cache index, then attend
    the t queries over every filled slot (causal in slot order, same segment, window).

    The cache ('cache' collection) holds k, v [B, S, K, H], the segment id of each slot (0 =
    padding or empty) and the next free slot; positions come from the caller (RoPE is applied
    before caching), so left-padded prompts decode exactly as their full forward does.
    """
    cfg = self.cfg
    b, t, kv, h = k.shape
    size = cfg.decode_cache
    ck = self.variable("cache", "k", jnp.zeros, (b, size, kv, h), k.dtype)
    cv = self.variable("cache", "v", jnp.zeros, (b, size, kv, h), v.dtype)
    cseg = self.variable("cache", "segment_ids", jnp.zeros, (b, size), jnp.int32)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    start = index.value
    ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), (0, start, 0, 0))
    cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), (0, start, 0, 0))
    cseg.value = jax.lax.dynamic_update_slice(cseg.value, segment_ids.astype(jnp.int32),
                                              (0, start))
    index.value = start + t
    mask = visible((start + jnp.arange(t))[:, None], jnp.arange(size)[None, :],
                   segment_ids[:, :, None], cseg.value[:, None, :], cfg.sliding_window, use_window)
    return _attend_explicit(q, ck.value, cv.value, mask[:, None], scale, cfg.attn_logit_softcap)
