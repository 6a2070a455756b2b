"""Decoder invariants that need no reference implementation (HF parity lives in test_hf_*)."""

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.models import Decoder, ModelConfig


def _init(cfg, t=8):
  import flax.linen as nn
  model = Decoder(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, t), jnp.int32))["params"])
  return model, params


def test_packing_never_crosses_segments(tiny_cfg):
  model, params = _init(tiny_cfg)
  rng = np.random.default_rng(0)
  a, b = rng.integers(1, 64, 5), rng.integers(1, 64, 7)
  packed = np.concatenate([a, b, [0, 0, 0, 0]])[None]
  seg = np.array([[1] * 5 + [2] * 7 + [0] * 4])
  pos = np.array([list(range(5)) + list(range(7)) + [0] * 4])
  out = model.apply({"params": params}, jnp.asarray(packed), positions=jnp.asarray(pos),
                    segment_ids=jnp.asarray(seg))
  la = model.apply({"params": params}, jnp.asarray(a[None]))
  lb = model.apply({"params": params}, jnp.asarray(b[None]))
  np.testing.assert_allclose(out[0, :5], la[0], atol=1e-5)
  np.testing.assert_allclose(out[0, 5:12], lb[0], atol=1e-5)
  # Changing the first example must not move the second one's logits at all.
  packed2 = packed.copy()
  packed2[0, :5] = (packed2[0, :5] + 1) % 64
  out2 = model.apply({"params": params}, jnp.asarray(packed2), positions=jnp.asarray(pos),
                     segment_ids=jnp.asarray(seg))
  np.testing.assert_array_equal(np.asarray(out2[0, 5:12]), np.asarray(out[0, 5:12]))


def test_remat_and_unroll_do_not_change_numerics(tiny_cfg):
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 8)))
  model, params = _init(tiny_cfg)

  def loss(p, m):
    return m.apply({"params": p}, tokens).mean()
  g0 = jax.grad(loss)(params, model)
  for kw in (dict(remat_policy="full"), dict(remat_policy="dots"), dict(scan_unroll=2)):
    g1 = jax.grad(loss)(params, Decoder(tiny_cfg.replace(**kw)))
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), g0, g1)


def test_large_config_shapes_without_memory():
  """Llama-2-7B shapes via eval_shape: nothing is allocated."""
  cfg = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                    num_heads=32, num_kv_heads=32)
  model = Decoder(cfg)
  shapes = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32)),
                          jax.random.key(0))
  n = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
  assert n == cfg.num_params() == 6_738_415_616
  q = shapes["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.value.shape == (32, 4096, 4096) and q.names == ("layers", "embed", "heads")


def test_bf16_compute_close_to_fp32(tiny_cfg):
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 8)))
  model, params = _init(tiny_cfg)
  ref = model.apply({"params": params}, tokens)
  out = Decoder(tiny_cfg.replace(dtype="bfloat16")).apply({"params": params}, tokens)
  assert out.dtype == jnp.float32  # logits always come back in float32
  np.testing.assert_allclose(out, ref, atol=5e-2)


def test_head_matmul_gradients_equal_plain_matmul():
  # The LM head's weight gradient goes through a materialised x^T on CPU: same values as autodiff.
  from ftjax.models import layers  # pylint: disable=g-import-not-at-top
  r = np.random.default_rng(0)
  x, w, dy = (jnp.asarray(r.standard_normal(s), jnp.float32)
              for s in ((2, 5, 8), (8, 16), (2, 5, 16)))
  y, vjp = jax.vjp(jax.jit(layers.head_matmul), x, w)
  y_ref, vjp_ref = jax.vjp(lambda x, w: x @ w, x, w)
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  for g, g_ref in zip(vjp(dy), vjp_ref(dy)):
    np.testing.assert_allclose(g, g_ref, atol=1e-5)
