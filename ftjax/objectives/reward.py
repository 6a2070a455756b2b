"""Reward model training: Bradley–Terry loss on paired data, as TRL 1.16 `RewardTrainer.compute_loss`.

  loss = -log σ(r_c - r_r - margin)       (margin from batch['margin'] when present, else 0)
       + center_rewards_coefficient · mean((r_c + r_r)²)     (optional, TRL's reward centring)
r = the scalar head at the last real token (`ftjax.models.reward.RewardModel`). Metrics (TRL names):
accuracy (r_c > r_r), margin (r_c - r_r), rewards/chosen, rewards/rejected. An MoE decoder's
router losses (`moe_aux_coef`, `moe_z_coef`) are added in training as in every ftjax objective;
TRL 1.16's RewardTrainer adds none, so set both to 0 for its exact loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ftjax.models.reward import as_reward_model
from ftjax.objectives import moe_aux, register
from ftjax.objectives import preference as pref


def bradley_terry(chosen_rewards, rejected_rewards, margin=None, center_coef: float = 0.0):
  """Per-pair losses [B] (the centring term is added per pair, so its mean is TRL's)."""
  d = chosen_rewards - rejected_rewards
  if margin is not None:
    d = d - margin
  losses = -jax.nn.log_sigmoid(d)
  if center_coef:
    losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
  return losses


def pair_rewards(model, params, batch):
  """([2B] rewards for [chosen; rejected] in one forward, MoE router aux dict or None)."""
  rows = pref.concat_rows(batch, ("chosen_", "rejected_"))
  return moe_aux.forward_model(as_reward_model(model), params, rows)


@register("reward")
def reward(params, batch, rng, ctx):
  """Paired batch -> (Σ Bradley–Terry losses, number of pairs), metrics."""
  del rng
  cfg = ctx.config
  r, aux = pair_rewards(ctx.model, params, batch)
  rc, rr = pref.halves(r)
  margin = batch.get("margin") if cfg.get("use_margin", True) else None
  coef = cfg.get("center_rewards_coefficient", None)
  losses = bradley_terry(rc, rr, margin, float(coef or 0.0))
  w = pref.row_weights(batch, losses.shape[0])
  b = w.sum()
  sg = jax.lax.stop_gradient
  metrics = {
      "accuracy": ((w * (sg(rc) > sg(rr))).sum(), b),
      "margin": ((w * sg(rc - rr)).sum(), b),
      "rewards/chosen": ((w * sg(rc)).sum(), b),
      "rewards/rejected": ((w * sg(rr)).sum(), b),
  }
  loss_sum, metrics = moe_aux.add_terms((w * losses).sum(), b, aux, ctx, metrics)
  return (loss_sum, b), metrics
