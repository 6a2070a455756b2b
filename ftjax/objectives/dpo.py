"""DPO and its loss-type family, matching TRL 1.16 `DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py).

With policy/reference summed completion log-probs, logratio = logp - ref_logp and
d = chosen_logratio - rejected_logratio, the per-pair losses are (TRL line refs, 1.16):
  sigmoid    -(1-ls) log σ(β d) - ls log σ(-β d)   (ls = label_smoothing = conservative DPO, as TRL
             <= 0.x; TRL 1.16 dropped ls from 'sigmoid', identical at ls = 0)            (l.1387)
  hinge      relu(1 - β d)                                                              (l.1390)
  ipo        (d_avg - 1/(2β))², d_avg: logratios divided by completion token counts     (l.1393)
  robust     (-(1-ls) log σ(β d) + ls log σ(-β d)) / (1 - 2 ls)                         (l.1428)
  bco_pair   -log σ(β lr_c) - log σ(-β lr_r)                                            (l.1433)
  sppo_hard  (lr_c - 1/(2β))² + (lr_r + 1/(2β))²                                        (l.1438)
  nca_pair   -log σ(β lr_c) - ½ log σ(-β lr_c) - ½ log σ(-β lr_r)                       (l.1419)
  apo_zero   (1 - σ(β lr_c)) + σ(β lr_r)                                                (l.1467)
  apo_down   σ(β lr_c) + (1 - σ(β (lr_c - lr_r)))                                       (l.1475)
The loss is the mean over pairs; RPO (`rpo_alpha`) adds α · token-mean NLL of the chosen
completions (TRL: loss_type=['sigmoid', 'sft'], loss_weights=[1, α]). Rewards are β · logratio.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ftjax.objectives import moe_aux, register
from ftjax.objectives import preference as pref

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair",
              "apo_zero", "apo_down")

_ls = jax.nn.log_sigmoid


def dpo_losses(loss_type: str, chosen_logratios, rejected_logratios, *, beta: float,
               label_smoothing: float = 0.0, chosen_counts=None, rejected_counts=None):
  """Per-pair losses [B] from log-ratios [B] (token counts [B] are needed by 'ipo')."""
  lr_c, lr_r = chosen_logratios, rejected_logratios
  d = lr_c - lr_r
  ls = label_smoothing
  if loss_type == "sigmoid":
    return -(1 - ls) * _ls(beta * d) - ls * _ls(-beta * d)
  if loss_type == "hinge":
    return jax.nn.relu(1 - beta * d)
  if loss_type == "ipo":
    d_avg = (lr_c / jnp.maximum(chosen_counts, 1.0)) - (lr_r / jnp.maximum(rejected_counts, 1.0))
    return (d_avg - 1 / (2 * beta)) ** 2
  if loss_type == "robust":
    return (-(1 - ls) * _ls(beta * d) + ls * _ls(-beta * d)) / (1 - 2 * ls)
  if loss_type == "bco_pair":
    return -_ls(beta * lr_c) - _ls(-beta * lr_r)
  if loss_type == "sppo_hard":
    return (lr_c - 0.5 / beta) ** 2 + (lr_r + 0.5 / beta) ** 2
  if loss_type == "nca_pair":
    return -_ls(beta * lr_c) - 0.5 * _ls(-beta * lr_c) - 0.5 * _ls(-beta * lr_r)
  if loss_type == "apo_zero":
    return (1 - jax.nn.sigmoid(beta * lr_c)) + jax.nn.sigmoid(beta * lr_r)
  if loss_type == "apo_down":
    return jax.nn.sigmoid(beta * lr_c) + (1 - jax.nn.sigmoid(beta * d))
  raise ValueError(f"config.objective.loss_type={loss_type!r}: unknown DPO loss "
                   f"(choose from {LOSS_TYPES})")


def check_config(cfg):
  """Validates the DPO options once at trace time; returns (beta, loss_type, ls, rpo_alpha)."""
  beta = pref.get_beta(cfg)
  loss_type = cfg.get("loss_type", "sigmoid")
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"config.objective.loss_type={loss_type!r}: unknown DPO loss "
                     f"(choose from {LOSS_TYPES})")
  ls = float(cfg.get("label_smoothing", 0.0))
  if loss_type == "robust" and not 0.0 <= ls < 0.5:
    raise ValueError(f"config.objective.label_smoothing={ls}: must be in [0, 0.5) for 'robust'")
  if not 0.0 <= ls <= 1.0:
    raise ValueError(f"config.objective.label_smoothing={ls}: must be in [0, 1]")
  return beta, loss_type, ls, float(cfg.get("rpo_alpha", 0.0) or 0.0)


@register("dpo")
def dpo(params, batch, rng, ctx):
  """Paired batch (see preference.py) -> (sum of per-pair losses, number of pairs), metrics."""
  del rng
  beta, loss_type, ls, rpo_alpha = check_config(ctx.config)
  pol, ref = pref.paired_forward(params, batch, ctx)
  logratios = pol["logps"] - ref
  lr_c, lr_r = pref.halves(logratios)
  n_c, n_r = pref.halves(pol["counts"])
  losses = dpo_losses(loss_type, lr_c, lr_r, beta=beta, label_smoothing=ls,
                      chosen_counts=n_c, rejected_counts=n_r)
  w = pref.row_weights(batch, losses.shape[0])
  num_pairs = w.sum()
  loss_sum = (w * losses).sum()
  metrics = pref.pair_metrics(pol, beta * lr_c, beta * lr_r, w=w)
  nll_sum, nll_count = pref.chosen_nll(pol)
  metrics["nll_loss"] = (jax.lax.stop_gradient(nll_sum), nll_count)
  if rpo_alpha:
    # TRL's 'sft' term is a token mean over the whole (micro-)batch, added once per batch.
    loss_sum = loss_sum + rpo_alpha * num_pairs * nll_sum / jnp.maximum(nll_count, 1.0)
  correct_c, _ = pref.halves(pol["correct"])
  mask_c, _ = pref.halves(pol["mask"])
  metrics["mean_token_accuracy"] = ((correct_c * mask_c).sum(), mask_c.sum())
  loss_sum, metrics = moe_aux.add_terms(loss_sum, num_pairs, pol.get("moe_aux"), ctx, metrics)
  return (loss_sum, num_pairs), metrics
