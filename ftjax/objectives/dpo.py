"""DPO and its loss-type family, matching TRL 1.16 `DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py).

With policy/reference summed completion log-probs, lr = logp - ref_logp (per side), the f-divergence
score s = f'(π/π_ref) of lr (`f_divergence_type`, f-DPO, arXiv 2309.16240; TRL l.1353):
  reverse_kl  s = lr   (standard DPO)        forward_kl  s = 1 - exp(-lr)
  js_divergence  s = log 2 + log σ(lr)       alpha_divergence  s = (exp((α-1) lr) - 1) / (α-1)
and d = s_c - s_r, the per-pair losses are (TRL line refs, 1.16):
  sigmoid    -(1-ls) log σ(β d) - ls log σ(-β d)   (ls = label_smoothing = conservative DPO, as TRL
             <= 0.x; TRL 1.16 dropped ls from 'sigmoid', identical at ls = 0, so a list mixing
             'sigmoid' with an ε for exo_pair / robust / aot differs from TRL 1.16)     (l.1387)
  hinge      relu(1 - β d)  (SLiC, arXiv 2305.10425)                                    (l.1390)
  ipo        (d_avg - 1/(2β))², d_avg: scores divided by completion token counts (IPO) (l.1393)
  exo_pair   KL(q ‖ p_ε), q = (σ(β d), σ(-β d)), p_ε = (1-ε, ε), ε = ls > 0 (EXO, 2402.00856)
             = q_w (log q_w - log(1-ε)) + q_l (log q_l - log ε)                         (l.1406)
  nca_pair   -log σ(β lr_c) - ½ log σ(-β lr_c) - ½ log σ(-β lr_r)  (NCA, 2402.05369)     (l.1419)
  robust     (-(1-ls) log σ(β d) + ls log σ(-β d)) / (1 - 2 ls)  (rDPO, 2403.00409)     (l.1428)
  bco_pair   -log σ(β lr_c) - log σ(-β lr_r)  (BCO, 2404.04656)                         (l.1433)
  sppo_hard  (lr_c - 1/(2β))² + (lr_r + 1/(2β))²  (SPPO, 2405.00675)                    (l.1438)
  aot        -(1-ls) log σ(β δ) - ls log σ(-β δ), δ = sort_B(logp_c - logp_r)
             - sort_B(ref_c - ref_r): batch-sorted (AOT, arXiv 2406.05882)              (l.1447)
  aot_unpaired  the same with δ = sort_B(lr_c) - sort_B(lr_r)                           (l.1458)
  apo_zero   (1 - σ(β lr_c)) + σ(β lr_r)  (APO, 2408.06266 eq. 7)                       (l.1467)
  apo_down   σ(β lr_c) + (1 - σ(β (lr_c - lr_r)))  (APO eq. 8)                          (l.1475)
  discopop   (1 - m) (-log σ(β d)) + m exp(-β d), m = σ(β d / τ)  (DiscoPOP, 2406.08414) (l.1483)
  sft        token-mean NLL of the chosen completions over the batch (RPO, 2404.19733)  (l.1495)
  sigmoid_norm  -log σ(β d_avg), d_avg as for 'ipo'                                     (l.1504)
`loss_type` may be one name or a list combined as Σ_k loss_weights[k] · mean_pairs(loss_k)
(TRL: `loss_type=[...]`, `loss_weights=[...]`, default all 1; e.g. MPO = sigmoid+bco_pair+sft).
The loss is the mean over pairs; `rpo_alpha` adds α · the 'sft' term (TRL's migration of RPO:
loss_type=['sigmoid', 'sft'], loss_weights=[1, α]). Rewards are β · lr whatever the divergence.
Two TRL options change the inputs of every loss type:
  ld_alpha       LD-DPO (arXiv 2409.06411): policy and reference logps sum each pair's first
                 min(len_c, len_r) completion tokens at weight 1 and the rest at ld_alpha ∈ [0, 1].
  use_weighting  WPO (arXiv 2406.11827 eq. 2): each pair's loss times w_c · w_r, w = exp(mean over
                 completion tokens of log p(y_t) - log Σ_v p_v²), no gradient through w.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from ftjax.objectives import moe_aux, register
from ftjax.objectives import preference as pref

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
              "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
              "sigmoid_norm")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The f-DPO reparameterisation leaves β log Z(x), which cancels only in the chosen - rejected
# score difference: TRL rejects a non-default divergence for every other loss.
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                       "discopop", "sft")

_ls = jax.nn.log_sigmoid


def f_scores(logratios, f_divergence: str = "reverse_kl", alpha: float = 0.5):
  """f'(π/π_ref) from log-ratios [B] (float32), as TRL 1.16 l.1353-1381."""
  if f_divergence == "reverse_kl":
    return logratios
  if f_divergence == "forward_kl":
    return 1 - jnp.exp(-logratios)
  if f_divergence == "js_divergence":
    return math.log(2) + _ls(logratios)
  if f_divergence == "alpha_divergence":
    if abs(alpha - 1.0) < 1e-6:  # limit f'(t) -> log t
      return logratios
    # TRL clamps the exponent at 80 (float32) so exp stays finite.
    return (jnp.exp(jnp.minimum((alpha - 1.0) * logratios, 80.0)) - 1.0) / (alpha - 1.0)
  raise ValueError(f"config.objective.f_divergence_type={f_divergence!r}: unknown "
                   f"(choose from {F_DIVERGENCES})")


def _sorted_pairs(a, b, w):
  """sort(a) - sort(b) over the real rows (w > 0) only; padding rows go last with weight 0."""
  big = jnp.finfo(jnp.float32).max
  n = w.sum()
  keep = jnp.arange(a.shape[0]) < n
  sa = jnp.sort(jnp.where(w > 0, a, big))
  sb = jnp.sort(jnp.where(w > 0, b, big))
  return jnp.where(keep, sa, 0.0) - jnp.where(keep, sb, 0.0)


def loss_weights_for(loss_type: str, weights):
  """Row weights [B] for `dpo_losses(loss_type, ...)`: sorted losses put the real rows first."""
  if loss_type in ("aot", "aot_unpaired"):
    return (jnp.arange(weights.shape[0]) < weights.sum()).astype(weights.dtype)
  return weights


def _smoothed_sigmoid(z, ls):
  return -(1 - ls) * _ls(z) - ls * _ls(-z)


def dpo_losses(loss_type: str, chosen_logratios, rejected_logratios, *, beta: float,
               label_smoothing: float = 0.0, chosen_counts=None, rejected_counts=None,
               ref_logps: Optional[Tuple[jax.Array, jax.Array]] = None, weights=None,
               f_divergence: str = "reverse_kl", f_alpha: float = 0.5,
               discopop_tau: float = 0.05):
  """Per-pair losses [B] of one loss type (not 'sft') from log-ratios [B].

  chosen/rejected_counts [B]: completion tokens ('ipo', 'sigmoid_norm'). ref_logps: (ref_c, ref_r)
  [B] each ('aot'). weights [B]: 1 for real rows, 0 for padding. 'aot*' sort the real rows only:
  their entry i is the i-th sorted pair, so weight them with `loss_weights_for`, not `weights`.
  """
  lr_c, lr_r = chosen_logratios, rejected_logratios
  s_c, s_r = f_scores(lr_c, f_divergence, f_alpha), f_scores(lr_r, f_divergence, f_alpha)
  d = s_c - s_r
  ls = label_smoothing
  if loss_type == "sigmoid":
    return _smoothed_sigmoid(beta * d, ls)
  if loss_type == "hinge":
    return jax.nn.relu(1 - beta * d)
  if loss_type in ("ipo", "sigmoid_norm"):
    d_avg = s_c / jnp.maximum(chosen_counts, 1.0) - s_r / jnp.maximum(rejected_counts, 1.0)
    return (d_avg - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -_ls(beta * d_avg)
  if loss_type == "exo_pair":
    z = beta * d
    return (jax.nn.sigmoid(z) * (_ls(z) - math.log1p(-ls))
            + jax.nn.sigmoid(-z) * (_ls(-z) - math.log(ls)))
  if loss_type == "robust":
    return (-(1 - ls) * _ls(beta * d) + ls * _ls(-beta * d)) / (1 - 2 * ls)
  if loss_type == "bco_pair":
    return -_ls(beta * lr_c) - _ls(-beta * lr_r)
  if loss_type == "sppo_hard":
    return (lr_c - 0.5 / beta) ** 2 + (lr_r + 0.5 / beta) ** 2
  if loss_type == "nca_pair":
    return -_ls(beta * lr_c) - 0.5 * _ls(-beta * lr_c) - 0.5 * _ls(-beta * lr_r)
  if loss_type in ("aot", "aot_unpaired"):
    w = jnp.ones_like(lr_c) if weights is None else weights
    if loss_type == "aot":
      ref_c, ref_r = ref_logps
      delta = _sorted_pairs(lr_c + ref_c - (lr_r + ref_r), ref_c - ref_r, w)
    else:
      delta = _sorted_pairs(lr_c, lr_r, w)
    return _smoothed_sigmoid(beta * delta, ls)
  if loss_type == "apo_zero":
    return (1 - jax.nn.sigmoid(beta * lr_c)) + jax.nn.sigmoid(beta * lr_r)
  if loss_type == "apo_down":
    return jax.nn.sigmoid(beta * lr_c) + (1 - jax.nn.sigmoid(beta * d))
  if loss_type == "discopop":
    z = beta * d
    # m · exp(-z) as exp(-z + log m): equal, and finite where exp(-z) alone overflows.
    return -_ls(z) * jax.nn.sigmoid(-z / discopop_tau) + jnp.exp(-z + _ls(z / discopop_tau))
  if loss_type == "sft":
    raise ValueError("'sft' is a batch-level token mean, not a per-pair loss (see `dpo`)")
  raise ValueError(f"config.objective.loss_type={loss_type!r}: unknown DPO loss "
                   f"(choose from {LOSS_TYPES})")


def _as_tuple(value) -> tuple:
  if value is None:
    return ()
  return (value,) if isinstance(value, (str, int, float)) else tuple(value)


def loss_terms(cfg) -> Tuple[Tuple[str, float], ...]:
  """((loss_type, weight), ...) from config.objective.loss_type / loss_weights (TRL semantics)."""
  types = _as_tuple(cfg.get("loss_type", "sigmoid")) or ("sigmoid",)
  weights = _as_tuple(cfg.get("loss_weights", None)) or (1.0,) * len(types)
  for t in types:
    if t not in LOSS_TYPES:
      raise ValueError(f"config.objective.loss_type={t!r}: unknown DPO loss "
                       f"(choose from {LOSS_TYPES})")
  if len(weights) != len(types):
    raise ValueError(f"config.objective.loss_weights={list(weights)}: need one weight per "
                     f"loss_type {list(types)}")
  return tuple(zip(types, map(float, weights)))


def check_config(cfg):
  """Validates the DPO options once at trace time; returns (beta, terms, ls, rpo_alpha)."""
  beta = pref.get_beta(cfg)
  terms = loss_terms(cfg)
  types = {t for t, _ in terms}
  ls = float(cfg.get("label_smoothing", 0.0))
  if "robust" in types and not 0.0 <= ls < 0.5:
    raise ValueError(f"config.objective.label_smoothing={ls}: must be in [0, 0.5) for 'robust'")
  if not 0.0 <= ls <= 1.0:
    raise ValueError(f"config.objective.label_smoothing={ls}: must be in [0, 1]")
  if "exo_pair" in types and not 0.0 < ls < 1.0:
    raise ValueError(f"config.objective.label_smoothing={ls}: 'exo_pair' needs 0 < ε < 1 "
                     "(the EXO paper recommends 1e-3)")
  f_div = cfg.get("f_divergence_type", "reverse_kl") or "reverse_kl"
  f_scores(jnp.zeros(()), f_div)  # unknown name -> error listing the known ones
  if f_div != "reverse_kl" and not types <= set(F_DIVERGENCE_LOSSES):
    raise ValueError(f"config.objective.f_divergence_type={f_div!r} works with "
                     f"{F_DIVERGENCE_LOSSES} only (got loss_type {sorted(types)})")
  if float(cfg.get("discopop_tau", 0.05)) <= 0:
    raise ValueError("config.objective.discopop_tau must be > 0")
  ld_alpha = cfg.get("ld_alpha", None)
  if ld_alpha is not None and not 0.0 <= float(ld_alpha) <= 1.0:
    raise ValueError(f"config.objective.ld_alpha={ld_alpha}: must be in [0, 1] (or None)")
  if cfg.get("use_weighting", False) and types & {"aot", "aot_unpaired"}:
    raise ValueError("config.objective.use_weighting (WPO) does not work with 'aot' / "
                     "'aot_unpaired': they sort the pairs, which misaligns per-pair weights")
  return beta, terms, ls, float(cfg.get("rpo_alpha", 0.0) or 0.0)


def wpo_weights(pol) -> jax.Array:
  """[B] WPO pair weights w_c · w_r (no gradient) from stats with `log_sum_sq` (see module doc)."""
  sg = jax.lax.stop_gradient
  aligned = (sg(pol["token_logps"]) - pol["log_sum_sq"]) * pol["mask"]
  w = jnp.exp(aligned.sum(-1) / jnp.maximum(pol["counts"], 1.0))
  w_c, w_r = pref.halves(w)
  return w_c * w_r


def _pair_loss_sum(terms: Sequence[Tuple[str, float]], w, lr_c, lr_r, ref, pol, cfg, beta, ls):
  """Σ_pairs Σ_k weight_k · loss_k for every loss type except 'sft'."""
  n_c, n_r = pref.halves(pol["counts"])
  total = jnp.zeros((), jnp.float32)
  for loss_type, weight in terms:
    if loss_type == "sft":
      continue
    losses = dpo_losses(
        loss_type, lr_c, lr_r, beta=beta, label_smoothing=ls, chosen_counts=n_c,
        rejected_counts=n_r, ref_logps=pref.halves(ref), weights=w,
        f_divergence=cfg.get("f_divergence_type", "reverse_kl") or "reverse_kl",
        f_alpha=float(cfg.get("f_alpha_divergence_coef", 0.5)),
        discopop_tau=float(cfg.get("discopop_tau", 0.05)))
    total = total + weight * (loss_weights_for(loss_type, w) * losses).sum()
  return total


@register("dpo")
def dpo(params, batch, rng, ctx):
  """Paired batch (see preference.py) -> (sum of per-pair losses, number of pairs), metrics."""
  del rng
  cfg = ctx.config
  beta, terms, ls, rpo_alpha = check_config(cfg)
  ld_alpha = cfg.get("ld_alpha", None)
  use_weighting = bool(cfg.get("use_weighting", False))
  pol, ref = pref.paired_forward(params, batch, ctx, with_sum_sq=use_weighting,
                                 ld_alpha=None if ld_alpha is None else float(ld_alpha))
  lr_c, lr_r = pref.halves(pol["logps"] - ref)
  w = pref.row_weights(batch, lr_c.shape[0])
  num_pairs = w.sum()
  loss_w = w * wpo_weights(pol) if use_weighting else w  # what each pair's losses count
  loss_sum = _pair_loss_sum(terms, loss_w, lr_c, lr_r, ref, pol, cfg, beta, ls)
  metrics = pref.pair_metrics(pol, beta * lr_c, beta * lr_r, w=w)
  nll_sum, nll_count = pref.chosen_nll(pol)
  metrics["nll_loss"] = (jax.lax.stop_gradient(nll_sum), nll_count)
  sft_weight = rpo_alpha + sum(wt for t, wt in terms if t == "sft")
  if sft_weight:
    # TRL's 'sft' term is a token mean over the whole (micro-)batch, added once per batch.
    loss_sum = loss_sum + sft_weight * loss_w.sum() * nll_sum / jnp.maximum(nll_count, 1.0)
  correct_c, _ = pref.halves(pol["correct"])
  mask_c, _ = pref.halves(pol["mask"])
  metrics["mean_token_accuracy"] = ((correct_c * mask_c).sum(), mask_c.sum())
  loss_sum, metrics = moe_aux.add_terms(loss_sum, num_pairs, pol.get("moe_aux"), ctx, metrics)
  return (loss_sum, num_pairs), metrics
