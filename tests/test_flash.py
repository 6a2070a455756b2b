"""Blockwise attention (ftjax.models.flash) equals the explicit masked softmax, forward and grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.models import attention as attn
from ftjax.models.flash import block_size, flash_attention


def _inputs(b, t, n, kv, h, seed=0):
  r = np.random.default_rng(seed)
  q, k, v, do = (jnp.asarray(r.standard_normal(s), jnp.float32)
                 for s in ((b, t, n, h), (b, t, kv, h), (b, t, kv, h), (b, t, n, h)))
  return q, k, v, do


def _value_and_grads(fn, q, k, v, do):
  return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * do),
                                    argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("t,n,kv,block,window,packed", [
    (96, 4, 2, 32, None, True),     # GQA, 3 blocks, packed segments and padding
    (100, 4, 4, 32, None, False),   # MHA, ragged last block
    (64, 6, 2, 16, 20, True),       # sliding window across blocks
    (48, 2, 1, None, None, True),   # MQA, a single block
])
def test_flash_matches_explicit(t, n, kv, block, window, packed):
  b, h = 2, 8
  q, k, v, do = _inputs(b, t, n, kv, h)
  seg = np.ones((b, t), np.int32)
  if packed:
    seg[0, t // 3:] = 2
    seg[1, :5] = 0  # left padding
    seg[1, t // 2:] = 3
  seg = jnp.asarray(seg)
  scale = h ** -0.5
  mask = attn.attention_mask(seg, window)
  ref = _value_and_grads(lambda q, k, v: attn._attend_explicit(q, k, v, mask, scale, None),
                         q, k, v, do)
  got = _value_and_grads(
      lambda q, k, v: flash_attention(q, k, v, seg, scale, window, block=block), q, k, v, do)
  out_ref = attn._attend_explicit(q, k, v, mask, scale, None)
  out = flash_attention(q, k, v, seg, scale, window, block=block)
  np.testing.assert_allclose(out, out_ref, atol=2e-5, rtol=0)
  for a, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(a, r, atol=1e-4 * max(1.0, float(jnp.abs(r).max())), rtol=0)


def test_flash_traced_window_switch():
  """Gemma-2 style: the window is switched on per layer by a traced bool (inside a scan)."""
  b, t, n, kv, h = 1, 64, 2, 1, 8
  q, k, v, _ = _inputs(b, t, n, kv, h, seed=1)
  seg = jnp.ones((b, t), jnp.int32)
  for on in (True, False):
    mask = attn.attention_mask(seg, 8, jnp.asarray(on))
    ref = attn._attend_explicit(q, k, v, mask, 0.3, None)
    got = jax.jit(lambda u: flash_attention(q, k, v, seg, 0.3, 8, u, block=16))(jnp.asarray(on))
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)


def test_attend_dispatch_and_errors():
  q, k, v, _ = _inputs(1, 32, 2, 1, 8)
  seg = jnp.ones((1, 32), jnp.int32)
  a = attn.attend(q, k, v, seg, 0.3, None, "flash")
  b = attn.attend(q, k, v, seg, 0.3, None, "xla")
  np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
  with pytest.raises(ValueError, match="attention_impl"):
    attn.attend(q, k, v, seg, 0.3, None, "nope")


def test_block_size():
  assert block_size(512) == 128 and block_size(100) == 100 and block_size(4096) == 512


def test_swiglu_grads_match_autodiff():
  from ftjax.models.layers import swiglu
  r = np.random.default_rng(3)
  g, u, dy = (jnp.asarray(r.standard_normal((4, 6)) * 3, jnp.float32) for _ in range(3))
  ref = jax.vjp(lambda g, u: jax.nn.silu(g) * u, g, u)
  got = jax.vjp(swiglu, g, u)
  np.testing.assert_allclose(got[0], ref[0], atol=1e-6)
  for a, b in zip(got[1](dy), ref[1](dy)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_causal_only_path_matches_segments_of_ones():
  """segment_ids=None masks only the diagonal blocks; must equal the full-mask path."""
  q, k, v, do = _inputs(2, 80, 4, 2, 8, seed=5)
  ones = jnp.ones((2, 80), jnp.int32)
  a = _value_and_grads(lambda q, k, v: flash_attention(q, k, v, None, 0.35, block=32), q, k, v, do)
  b = _value_and_grads(lambda q, k, v: flash_attention(q, k, v, ones, 0.35, block=32), q, k, v, do)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
