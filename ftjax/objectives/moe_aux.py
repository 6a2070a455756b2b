"""MoE router terms for any objective: forward with the 'aux' collection, add weighted losses.

Use in an objective (two lines; a dense model returns aux=None and nothing changes):

    logits, aux = moe_aux.forward(ctx, params, batch)
    loss_sum, metrics = moe_aux.add_terms(loss_sum, denom, aux, ctx, metrics)

Coefficients come from the objective config: `moe_aux_coef` (load balancing, default 0.01) and
`moe_z_coef` (router z-loss, default 0.001). The loss is (sum, denom), so a term c * aux is added
as c * aux * denom: after the trainer divides by the summed denominator it is exactly the
token-weighted mean of c * aux over micro-batches. Evaluation (ctx.train False) reports the router
metrics but leaves the loss a pure objective loss, comparable with dense models.
"""

from __future__ import annotations

import jax.numpy as jnp

from ftjax.models.moe import collect_aux
from ftjax.objectives.common import forward as _forward

DEFAULT_AUX_COEF = 0.01
DEFAULT_Z_COEF = 0.001
# Per-(layer, expert) load metrics are written only up to this many pairs (the train loop logs
# every metric); beyond it only the per-layer max/min summaries.
MAX_LOAD_METRICS = 64


def forward(ctx, params, batch, prefix: str = "", **kw):
  """(logits [B, T, V] float32, aux dict or None) — see `ftjax.models.moe.collect_aux`."""
  return forward_model(ctx.model, params, batch, prefix, **kw)


def forward_model(model, params, batch, prefix: str = "", **kw):
  """`forward` for callers holding the model rather than an ObjectiveContext."""
  if not getattr(getattr(model, "cfg", None), "num_experts", 0):
    return _forward(model, params, batch, prefix, **kw), None
  logits, variables = _forward(model, params, batch, prefix, mutable=["aux"], **kw)
  return logits, collect_aux(variables.get("aux", {}))


def _coef(obj_cfg, name: str, default: float) -> float:
  try:
    value = obj_cfg.get(name, default)
  except AttributeError:
    value = default
  return float(default if value is None else value)


def add_terms(loss_sum, denom, aux, ctx, metrics: dict):
  """Adds coef * aux * denom to loss_sum (training only) and (sum, count) router metrics."""
  if aux is None:
    return loss_sum, metrics
  if getattr(ctx, "train", True):
    lb_coef = _coef(ctx.config, "moe_aux_coef", DEFAULT_AUX_COEF)
    z_coef = _coef(ctx.config, "moe_z_coef", DEFAULT_Z_COEF)
    loss_sum = loss_sum + (lb_coef * aux["lb_loss"] + z_coef * aux["z_loss"]) * denom
  metrics = dict(metrics)
  metrics.update(router_metrics(aux))
  return loss_sum, metrics


def router_metrics(aux) -> dict:
  """(sum, count) pairs: losses per micro-batch, load and dropped fraction as exact ratios."""
  one = jnp.ones((), jnp.float32)
  out = {
      "moe_lb_loss": (aux["lb_loss"], one),
      "moe_z_loss": (aux["z_loss"], one),
      "moe_dropped_frac": (aux["dropped"].sum(), aux["assigned"].sum()),
  }
  counts, assigned = aux["counts"], aux["assigned"]
  num_layers, num_experts = counts.shape
  for l in range(num_layers):
    # max load x E: 1.0 is perfect balance, E means one expert takes every assignment.
    out[f"moe_max_load/layer{l}"] = (counts[l].max() * num_experts, assigned[l])
    out[f"moe_min_load/layer{l}"] = (counts[l].min() * num_experts, assigned[l])
    if num_layers * num_experts <= MAX_LOAD_METRICS:
      for e in range(num_experts):
        out[f"moe_load/layer{l}_expert{e}"] = (counts[l, e], assigned[l])
  return out
