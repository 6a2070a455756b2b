"""KV-cache greedy decoding equals full re-forward decoding; cached logits equal the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.generate import greedy_generate
from ftjax.models import Decoder, ModelConfig


def _model(**kw):
  cfg = ModelConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, **kw)
  model = Decoder(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  # sharpen the random model so greedy paths differ between prompts (a flat model repeats)
  params = jax.tree_util.tree_map(lambda x: x * 3.0, params)
  return model, params


@pytest.mark.parametrize("kw", [{}, {"sliding_window": 3}, {"qk_norm": True},
                                {"num_experts": 4, "num_experts_per_tok": 2,
                                 "moe_intermediate_size": 16, "moe_dispatch": "dropless"}])
def test_cached_greedy_equals_full_greedy(kw):
  model, params = _model(**kw)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 48, n).tolist() for n in (3, 7, 5, 1)]  # ragged: left padding
  full = greedy_generate(model, params, prompts, max_new_tokens=6, eos_id=47, batch_size=4,
                         use_cache=False)
  cached = greedy_generate(model, params, prompts, max_new_tokens=6, eos_id=47, batch_size=4)
  assert cached == full
  assert len({tuple(x) for x in full}) > 1  # the test sees different continuations


def test_decode_steps_match_full_forward_logits():
  model, params = _model()
  b, p, extra = 2, 5, 4
  toks = jax.random.randint(jax.random.key(1), (b, p + extra), 1, 48)
  valid = jnp.ones((b, p + extra), bool).at[0, :2].set(False)  # row 0 left-padded
  seg = valid.astype(jnp.int32)
  pos = jnp.maximum(jnp.cumsum(valid, 1) - 1, 0)
  ref = model.apply({"params": params}, toks, positions=pos, segment_ids=seg)
  dm = model.clone(cfg=model.cfg.replace(decode_cache=p + extra))
  shapes = jax.eval_shape(lambda: dm.init(jax.random.key(0), toks[:, :p], positions=pos[:, :p],
                                          segment_ids=seg[:, :p]))["cache"]
  cache = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
  out, v = dm.apply({"params": params, "cache": cache}, toks[:, :p], positions=pos[:, :p],
                    segment_ids=seg[:, :p], mutable=["cache"])
  got = [out]
  for i in range(p, p + extra):
    out, v = dm.apply({"params": params, "cache": v["cache"]}, toks[:, i:i + 1],
                      positions=pos[:, i:i + 1], segment_ids=seg[:, i:i + 1], mutable=["cache"])
    got.append(out)
  got = jnp.concatenate(got, axis=1)
  real = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], atol=1e-5, rtol=0)


def test_capacity_moe_falls_back_to_full_decoding():
  model, params = _model(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                         moe_dispatch="capacity")
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
  full = greedy_generate(model, params, prompts, max_new_tokens=5, eos_id=47, batch_size=4,
                         use_cache=False)
  assert greedy_generate(model, params, prompts, max_new_tokens=5, eos_id=47,
                         batch_size=4) == full
