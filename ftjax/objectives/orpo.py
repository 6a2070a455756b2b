"""ORPO, matching TRL 1.16 `ORPOTrainer` (trl/experimental/orpo/orpo_trainer.py).

With policy log-probs AVERAGED over completion tokens (`average_log_prob=True`), p_c and p_r:
  log_odds = (p_c - p_r) - (log(1 - e^p_c) - log(1 - e^p_r))           (`odds_ratio_loss`)
  ratio    = log σ(log_odds)
  loss     = NLL_chosen - β · mean(ratio)                               (`get_batch_loss_metrics`)
where NLL_chosen is the token-mean cross-entropy of the chosen rows over the FULL sequence (prompt
and completion, as TRL's `concatenated_forward`). Metrics: `log_odds_ratio` = mean(ratio),
`log_odds_chosen` = mean(log_odds), `nll_loss`; rewards are β · p.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ftjax.objectives import moe_aux, register
from ftjax.objectives import preference as pref


def log1mexp(x):
  """log(1 - e^x) for x < 0, branching at -ln 2 to avoid cancellation (TRL's `log1mexp`)."""
  t = -math.log(2.0)
  # Each branch gets an input that is safe for it, so the unused branch has no NaN gradient.
  lo = jnp.log1p(-jnp.exp(jnp.minimum(x, t)))
  hi = jnp.log(-jnp.expm1(jnp.maximum(x, t)))
  return jnp.where(x < t, lo, hi)


def odds_ratio(chosen_logps, rejected_logps):
  """(ratio [B], log_odds [B]) from averaged log-probs [B] (float32)."""
  c = chosen_logps.astype(jnp.float32)
  r = rejected_logps.astype(jnp.float32)
  log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
  return jax.nn.log_sigmoid(log_odds), log_odds


@register("orpo")
def orpo(params, batch, rng, ctx):
  """Paired batch -> (B · NLL - β · Σ ratio, B), metrics."""
  del rng
  beta = pref.get_beta(ctx.config)
  pol, _ = pref.paired_forward(params, batch, ctx, need_reference=False)
  w = pref.row_weights(batch, batch["chosen_tokens"].shape[0])
  avg = pref.safe_mean_logps(pol, jnp.concatenate([w, w]))
  p_c, p_r = pref.halves(avg)
  ratio, log_odds = odds_ratio(p_c, p_r)
  nll_sum, nll_count = pref.chosen_nll(pol, mask=pol["valid"])
  nll = nll_sum / jnp.maximum(nll_count, 1.0)
  b = w.sum()
  loss_sum = b * nll - beta * (w * ratio).sum()
  metrics = pref.pair_metrics(pol, beta * p_c, beta * p_r, logps=avg, w=w)
  sg = jax.lax.stop_gradient
  metrics.update({
      "nll_loss": (sg(nll_sum), nll_count),
      "log_odds_ratio": (sg(w * ratio).sum(), b),
      "log_odds_chosen": (sg(w * log_odds).sum(), b),
  })
  loss_sum, metrics = moe_aux.add_terms(loss_sum, b, pol.get("moe_aux"), ctx, metrics)
  return (loss_sum, b), metrics
