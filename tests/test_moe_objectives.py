"""MoE router terms reach every preference objective (not only SFT), during training only."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ftjax import objectives
from ftjax.models import Decoder, ModelConfig
from ftjax.objectives import ObjectiveContext


def _batch(b=2, t=8, seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for side in ("chosen", "rejected"):
    toks = rng.integers(1, 64, (b, t)).astype(np.int32)
    out[f"{side}_tokens"] = toks
    out[f"{side}_targets"] = np.roll(toks, -1, 1)
    mask = np.zeros((b, t), np.float32)
    mask[:, 3:-1] = 1
    out[f"{side}_loss_mask"] = mask
    out[f"{side}_segment_ids"] = np.ones((b, t), np.int32)
    out[f"{side}_positions"] = np.tile(np.arange(t, dtype=np.int32), (b, 1))
  return {k: jnp.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("name", ["dpo", "simpo", "orpo", "reward"])
def test_preference_objectives_add_router_losses(name):
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, num_experts=4, num_experts_per_tok=2,
                    head="reward" if name == "reward" else "lm")
  model = Decoder(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  batch = _batch()
  fn = objectives.get(name)

  def run(coef, train=True):
    oc = ml_collections.ConfigDict(dict(name=name, beta=0.1, reference="none",
                                        moe_aux_coef=coef, moe_z_coef=0.0))
    ctx = ObjectiveContext(model=model, config=oc, train=train)
    (loss_sum, denom), metrics = fn(params, batch, jax.random.key(1), ctx)
    return float(loss_sum), float(denom), metrics

  base, denom, metrics = run(0.0)
  with_aux, _, _ = run(0.5)
  lb = float(metrics["moe_lb_loss"][0]) / float(metrics["moe_lb_loss"][1])
  assert lb > 0
  np.testing.assert_allclose(with_aux - base, 0.5 * lb * denom, rtol=1e-4)
  eval_loss, _, _ = run(0.5, train=False)
  np.testing.assert_allclose(eval_loss, base, rtol=1e-6)
