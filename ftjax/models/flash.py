"""Blockwise causal attention with a hand-written backward pass (the CPU default).

Why not `jax.nn.dot_product_attention` or one big masked softmax on CPU: both materialise the full
[T, S] logits, half of which the causal mask throws away, and XLA:CPU then spends more time
transposing and re-reading that square (its backward contracts it over both axes) than in the
matmuls. Here queries are cut into blocks and block i only meets keys [0, end of block i), so the
score matrices cover ~(1 + 1/n_blocks) / 2 of the square (62.5% at 4 blocks), and every block is
kept in one "keys-major" layout [B, K, keys, rows] (rows = (query, grouped head) pairs, one merged
axis), with every product a single-contraction matmul:

  forward   s = k q^T      (contract head dim)     o = p^T v       (contract keys)
  backward  dp = v do^T    (contract head dim)     dq = ds^T k     (contract keys)
            dk = ds q,  dv = p do                  (contract rows)

o and dq come out in [B, K, rows, H], the layout their consumers want, so nothing but the usual
head transposes sits between the blocks and the projections (writing them transposed, o^T = v^T p,
cost more in the transposing copies back than it saved in the matmuls). Merging (query, group)
into one axis matters: with two contracting axes XLA reordered them through a transposing copy of
every probability block. Grouped-query heads ride in the rows so K/V are never repeated; the
softmax is float32 and the probabilities are kept for the backward pass (no recompute: on CPU the
extra matmul costs more than re-reading them). Numerics equal the plain softmax path to float32
rounding (tested against it and against HF transformers).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

_NEG = -1e30  # additive mask value; finite so fully masked padding rows never make NaNs


def block_size(t: int, max_blocks: int = 8, min_block: int = 128) -> int:
  """Query block: at least `min_block` rows, at most `max_blocks` blocks (unrolled in the graph)."""
  n = max(1, min(max_blocks, -(-t // min_block)))
  return -(-t // n)


def _blocks(t: int, bq: int):
  return [(i, min(i + bq, t)) for i in range(0, t, bq)]


def visible(q_idx, k_idx, q_seg=None, k_seg=None, window: Optional[int] = None,
            use_window=None):
  """Key k visible from query q: causal (k <= q), same segment, and (optionally) q - k < window.

  The one masking rule of every attention path. Arguments are already broadcast against each
  other, which picks the layout: q_idx [Tq, 1] with k_idx [1, Tk] gives query-major masks, the
  transposed pair the keys-major blocks here. q_seg / k_seg (same broadcasting plus a leading
  batch dim) are segment ids: padding is 0 and only meets padding, so no query row is ever empty.
  `use_window` (traced bool) switches the window per layer (Gemma 2 alternates).
  """
  ok = k_idx <= q_idx
  if window is not None:
    in_window = (q_idx - k_idx) < window
    if use_window is not None:
      in_window = in_window | ~use_window
    ok = ok & in_window
  if q_seg is not None:
    ok = ok[None] & (q_seg == k_seg)
  return ok


def _mask_T(seg, use_window, i0: int, i1: int, g: int, window: Optional[int]):
  """Boolean [B or 1, 1, i1, (i1 - i0) * g]: key j (rows) visible from query row (i, group)."""
  seg_pair = (None, None) if seg is None else (seg[:, None, i0:i1], seg[:, :i1, None])
  ok = visible(jnp.arange(i0, i1)[None, :], jnp.arange(i1)[:, None], *seg_pair, window,
               use_window)
  ok = (ok if seg is not None else ok[None])[:, None, :, :, None]
  return jnp.broadcast_to(ok, ok.shape[:-1] + (g,)).reshape(ok.shape[:3] + (-1,))


def _forward(qr, kh, vh, seg, use_window, bq, g, window):
  """qr [B,K,T*G,H] (rows = (query, group), already scaled), kh/vh [B,K,S,H] -> o [B,K,T*G,H].

  Rows merge each query with its G grouped heads, so every product has one contracting axis and
  XLA never reorders (query, group) pairs with a transposing copy. Returns o and, per block, the
  query rows and probabilities: the backward pass reuses those copies instead of slicing q again
  (XLA:CPU re-evaluated the producers fused into each slice).
  """
  outs, blocks = [], []
  for i0, i1 in _blocks(qr.shape[2] // g, bq):
    q_i, k_i, v_i = qr[:, :, i0 * g:i1 * g], kh[:, :, :i1], vh[:, :, :i1]
    s = jnp.einsum("bksh,bkrh->bksr", k_i, q_i, preferred_element_type=jnp.float32)
    if seg is None and window is None:
      # Only causal: keys [0, i0) are all visible, so mask just the diagonal square in place.
      diag = jnp.where(_mask_T(None, None, i0, i1, g, None)[:, :, i0:], s[:, :, i0:], _NEG)
      s = s.at[:, :, i0:].set(diag)
    else:
      s = jnp.where(_mask_T(seg, use_window, i0, i1, g, window), s, _NEG)
    p = jnp.exp(s - jnp.max(s, axis=2, keepdims=True))
    p = p / jnp.sum(p, axis=2, keepdims=True)
    outs.append(jnp.einsum("bksr,bksh->bkrh", p.astype(vh.dtype), v_i))
    blocks.append((q_i, p))
  o = jnp.concatenate(outs, axis=2)  # [B, K, T*G, H]
  return o, blocks


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(qr, kh, vh, seg, use_window, bq, g, window):
  return _forward(qr, kh, vh, seg, use_window, bq, g, window)[0]


def _flash_fwd(qr, kh, vh, seg, use_window, bq, g, window):
  o, blocks = _forward(qr, kh, vh, seg, use_window, bq, g, window)
  return o, (kh, vh, o, blocks)


def _flash_bwd(bq, g, window, res, do):
  kh, vh, o, blocks = res
  # softmax backward: ds = p * (dp - rowsum(do * o)), the rowsum being sum_j p_j dp_j.
  dsum = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [B, K, T*G]
  q_dtype = blocks[0][0].dtype
  b, kv, tg, h = o.shape
  dq_blocks = []
  dk = jnp.zeros((b, kv, tg // g, h), jnp.float32)
  dv = jnp.zeros((b, kv, tg // g, h), jnp.float32)
  for (i0, i1), (q_i, p) in zip(_blocks(tg // g, bq), blocks):
    do_i, k_i, v_i = do[:, :, i0 * g:i1 * g], kh[:, :, :i1], vh[:, :, :i1]
    dp = jnp.einsum("bksh,bkrh->bksr", v_i, do_i, preferred_element_type=jnp.float32)
    ds = (p * (dp - dsum[:, :, None, i0 * g:i1 * g])).astype(q_dtype)
    dq_blocks.append(jnp.einsum("bksr,bksh->bkrh", ds, k_i))
    dk = dk.at[:, :, :i1].add(
        jnp.einsum("bksr,bkrh->bksh", ds, q_i, preferred_element_type=jnp.float32))
    dv = dv.at[:, :, :i1].add(
        jnp.einsum("bksr,bkrh->bksh", p.astype(do.dtype), do_i,
                   preferred_element_type=jnp.float32))
  dq = jnp.concatenate(dq_blocks, axis=2)
  return dq, dk.astype(kh.dtype), dv.astype(vh.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, segment_ids, scale: float, window: Optional[int] = None,
                    use_window=None, block: Optional[int] = None):
  """Causal GQA attention. q [B,T,N,H], k/v [B,T,K,H], segment_ids [B,T] (None = one segment).

  Masks as `attention.attention_mask`: causal, same segment, and (optionally) key j visible from
  query i only when i - j < window; `use_window` (traced bool) switches the window per layer.
  """
  b, t, n, h = q.shape
  kv = k.shape[2]
  if k.shape[1] != t:
    raise ValueError(f"flash_attention is self-attention: {t} queries vs {k.shape[1]} keys")
  # N = K * G with kv-head-major order (HF repeat_kv); scaling q once is cheaper than the scores.
  g = n // kv
  qr = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, kv, g, h).transpose(0, 2, 1, 3, 4)
  qr = qr.reshape(b, kv, t * g, h)
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
  if use_window is not None:
    use_window = jnp.asarray(use_window, bool)
  o = _flash(qr, kh, vh, segment_ids, use_window, block or block_size(t), g, window)
  return o.reshape(b, kv, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)
