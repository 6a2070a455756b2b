"""KTO, matching TRL 1.16 `KTOTrainer._compute_loss` (trl/trainer/kto_trainer.py).

Unpaired rows with label y (1 desirable, 0 undesirable), logratio lr = logp - ref_logp (summed
completion log-probs) and the KL estimate from mismatched (prompt i, completion i-1) rows
  z = max(0, mean(logp_KL - ref_logp_KL))       detached, clamped at 0         (l.1443)
  desirable    w_d · (1 - σ(β (lr - z)))        (KTO paper Eq. 7)               (l.1453)
  undesirable  w_u · (1 - σ(β (z - lr)))                                        (l.1470)
loss = mean over rows. 'apo_zero_unpaired' uses 1 - σ(β lr) and σ(β lr) and no KL term.
Metrics: rewards/chosen|rejected (β · lr over desirable|undesirable rows), logps/*, logits/*,
rewards/margins (difference of the two means, per batch) and kl.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ftjax.objectives import moe_aux, register
from ftjax.objectives import preference as pref

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_losses(loss_type: str, logratios, labels, kl, *, beta: float,
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
  """Per-row losses [B] from logratios [B], bool labels [B] and the scalar KL estimate."""
  if loss_type == "kto":
    good = 1 - jax.nn.sigmoid(beta * (logratios - kl))
    bad = 1 - jax.nn.sigmoid(beta * (kl - logratios))
  elif loss_type == "apo_zero_unpaired":
    good = 1 - jax.nn.sigmoid(beta * logratios)
    bad = jax.nn.sigmoid(beta * logratios)
  else:
    raise ValueError(f"config.objective.loss_type={loss_type!r}: unknown KTO loss "
                     f"(choose from {KTO_LOSS_TYPES})")
  return jnp.where(labels, desirable_weight * good, undesirable_weight * bad)


def kl_estimate(kl_logps, ref_kl_logps, w=None):
  """max(0, mean(policy - reference)) over the mismatched rows (w: row weights), no gradient."""
  w = jnp.ones_like(kl_logps) if w is None else w
  mean = (w * (kl_logps - ref_kl_logps)).sum() / jnp.maximum(w.sum(), 1.0)
  return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


@register("kto")
def kto(params, batch, rng, ctx):
  """Unpaired batch (see preference.py) -> (sum of row losses, rows), metrics."""
  del rng
  cfg = ctx.config
  beta = pref.get_beta(cfg)
  loss_type = cfg.get("loss_type", "kto")
  if loss_type not in KTO_LOSS_TYPES:
    raise ValueError(f"config.objective.loss_type={loss_type!r}: unknown KTO loss "
                     f"(choose from {KTO_LOSS_TYPES})")
  b = batch["tokens"].shape[0]
  use_kl = loss_type == "kto"
  if use_kl and b <= 1:
    raise ValueError("KTO needs more than 1 row per (micro-)batch: the KL estimate would equal the "
                     "implied reward (raise config.train.batch_size or lower grad_accum_steps)")
  prefixes = ("", "kl_") if use_kl else ("",)
  rows = pref.concat_rows(batch, prefixes)
  pol = pref.sequence_stats(ctx.model, params, rows)
  cached = ("ref_logps", "ref_kl_logps") if use_kl else ("ref_logps",)
  ref = pref.reference_logps(params, rows, batch, ctx, cached)
  w = pref.row_weights(batch, b)
  logratios = (pol["logps"] - ref)[:b]
  kl = kl_estimate(pol["logps"][b:], ref[b:], w) if use_kl else jnp.float32(0.0)
  labels = batch["label"].astype(bool)
  losses = kto_losses(loss_type, logratios, labels, kl, beta=beta,
                      desirable_weight=float(cfg.get("desirable_weight", 1.0)),
                      undesirable_weight=float(cfg.get("undesirable_weight", 1.0)))
  metrics = _metrics(pol, b, labels, beta * logratios, kl, w)
  loss_sum, metrics = moe_aux.add_terms((w * losses).sum(), w.sum(), pol.get("moe_aux"), ctx,
                                       metrics)
  return (loss_sum, w.sum()), metrics


def _metrics(pol, b, labels, rewards, kl, w):
  sg = jax.lax.stop_gradient
  good = labels.astype(jnp.float32) * w
  bad = (1.0 - labels.astype(jnp.float32)) * w
  rewards = sg(rewards)
  logps = sg(pol["logps"][:b])
  logits_sum, counts = pol["logits_sum"][:b], pol["counts"][:b]
  n_good, n_bad = good.sum(), bad.sum()
  mean_good = (rewards * good).sum() / jnp.maximum(n_good, 1.0)
  mean_bad = (rewards * bad).sum() / jnp.maximum(n_bad, 1.0)
  both = (n_good > 0) & (n_bad > 0)
  return {
      "rewards/chosen": ((rewards * good).sum(), n_good),
      "rewards/rejected": ((rewards * bad).sum(), n_bad),
      "rewards/margins": (jnp.where(both, mean_good - mean_bad, 0.0), both.astype(jnp.float32)),
      "logps/chosen": ((logps * good).sum(), n_good),
      "logps/rejected": ((logps * bad).sum(), n_bad),
      "logits/chosen": ((logits_sum * good).sum(), (counts * good).sum()),
      "logits/rejected": ((logits_sum * bad).sum(), (counts * bad).sum()),
      "kl": (kl, jnp.float32(1.0)),
  }
