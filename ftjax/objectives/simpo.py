"""SimPO and CPO (reference-free), matching TRL 1.16 `CPOTrainer.cpo_loss` (trl/experimental/cpo).

With policy log-probs logp (length-AVERAGED over completion tokens for 'simpo' and 'ipo', summed
otherwise, as TRL's `average_log_prob=loss_type in ['ipo', 'simpo']`) and h = logp_c - logp_r:
  simpo    h' = h - γ/β;  -(1-ls) log σ(β h') - ls log σ(-β h')                (cpo_trainer.py l.715)
  sigmoid  -(1-ls) log σ(β h) - ls log σ(-β h)                    (CPO, Eq. 3)  (l.723)
  hinge    relu(1 - β h)                                                         (l.729)
  ipo      (h - 1/(2β))²                                                         (l.731)
loss = mean over pairs + cpo_alpha · token-mean NLL of the chosen completions
(`get_batch_loss_metrics`: `losses.mean() + self.cpo_alpha * policy_nll_loss`). Rewards are β · logp.
'simpo' defaults to cpo_alpha = 0 (plain SimPO); 'cpo' defaults to TRL's cpo_alpha = 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ftjax.objectives import moe_aux, register
from ftjax.objectives import preference as pref

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
_ls = jax.nn.log_sigmoid


def cpo_losses(loss_type: str, chosen_logps, rejected_logps, *, beta: float,
               label_smoothing: float = 0.0, simpo_gamma: float = 0.5):
  """Per-pair losses [B] from policy log-probs [B] (already averaged where TRL averages)."""
  h = chosen_logps - rejected_logps
  ls = label_smoothing
  if loss_type == "simpo":
    h = h - simpo_gamma / beta
    return -_ls(beta * h) * (1 - ls) - _ls(-beta * h) * ls
  if loss_type == "sigmoid":
    return -_ls(beta * h) * (1 - ls) - _ls(-beta * h) * ls
  if loss_type == "hinge":
    return jax.nn.relu(1 - beta * h)
  if loss_type == "ipo":
    return (h - 1 / (2 * beta)) ** 2
  raise ValueError(f"config.objective.loss_type={loss_type!r}: unknown CPO/SimPO loss "
                   f"(choose from {CPO_LOSS_TYPES})")


def _objective(params, batch, ctx, loss_type: str, cpo_alpha: float):
  cfg = ctx.config
  beta = pref.get_beta(cfg)
  if loss_type not in CPO_LOSS_TYPES:
    raise ValueError(f"config.objective.loss_type={loss_type!r}: unknown CPO/SimPO loss "
                     f"(choose from {CPO_LOSS_TYPES})")
  pol, _ = pref.paired_forward(params, batch, ctx, need_reference=False)
  b = batch["chosen_tokens"].shape[0]
  w = pref.row_weights(batch, b)
  logps = pol["logps"]
  if loss_type in ("simpo", "ipo"):
    logps = pref.safe_mean_logps(pol, jnp.concatenate([w, w]))
  lp_c, lp_r = pref.halves(logps)
  losses = cpo_losses(loss_type, lp_c, lp_r, beta=beta,
                      label_smoothing=float(cfg.get("label_smoothing", 0.0)),
                      simpo_gamma=float(cfg.get("simpo_gamma", 0.5)))
  num_pairs = w.sum()
  loss_sum = (w * losses).sum()
  nll_sum, nll_count = pref.chosen_nll(pol)
  if cpo_alpha:
    loss_sum = loss_sum + cpo_alpha * num_pairs * nll_sum / jnp.maximum(nll_count, 1.0)
  metrics = pref.pair_metrics(pol, beta * lp_c, beta * lp_r, logps=logps, w=w)
  metrics["nll_loss"] = (jax.lax.stop_gradient(nll_sum), nll_count)
  loss_sum, metrics = moe_aux.add_terms(loss_sum, num_pairs, pol.get("moe_aux"), ctx, metrics)
  return (loss_sum, num_pairs), metrics


@register("simpo")
def simpo(params, batch, rng, ctx):
  """SimPO: length-averaged log-probs, target margin `simpo_gamma`, optional `cpo_alpha` NLL."""
  del rng
  return _objective(params, batch, ctx, "simpo", float(ctx.config.get("cpo_alpha", 0.0) or 0.0))


@register("cpo")
def cpo(params, batch, rng, ctx):
  """CPO: `loss_type` sigmoid | hinge | ipo | simpo with `cpo_alpha` (default 1.0) NLL."""
  del rng
  cfg = ctx.config
  return _objective(params, batch, ctx, cfg.get("loss_type", "sigmoid"),
                    float(cfg.get("cpo_alpha", 1.0)))
