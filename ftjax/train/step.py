"""The jitted train and eval steps: one for every objective.

Gradient accumulation keeps token-weighted means exact: the objective returns (loss_sum, denom);
micro-batch gradients of loss_sum are summed and divided once by the total denominator, which is
the gradient of sum(loss_sum) / sum(denom) over the whole global batch (and across hosts, since
the batch is one global jax.Array).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from ftjax.objectives import ObjectiveContext
# Union of two nested dicts with disjoint leaves (the trainable/frozen halves of the params).
from ftjax.peft.tree import merge_trainable as merge_params  # pylint: disable=unused-import


def _add(a, b):
  return jax.tree_util.tree_map(jnp.add, a, b)


def make_train_step(model, objective_fn: Callable, obj_cfg, tx, sched, *,
                    update_scale_fn: Optional[Callable] = None):
  """state = {params (trainable), opt_state, step, rng}; batch leaves are [accum, micro, ...]."""

  def loss_and_grad(trainable, frozen, ref_params, mb, rng):
    ctx = ObjectiveContext(model=model, config=obj_cfg, ref_params=ref_params, train=True)

    def f(p):
      (loss_sum, denom), metrics = objective_fn(merge_params(p, frozen), mb, rng, ctx)
      return loss_sum, (denom, metrics)
    (loss_sum, (denom, metrics)), grads = jax.value_and_grad(f, has_aux=True)(trainable)
    return loss_sum, denom, metrics, grads

  def step(state, frozen, batch, ref_params=None):
    rng, step_rng = jax.random.split(state["rng"])
    accum = jax.tree_util.tree_leaves(batch)[0].shape[0]
    first = jax.tree_util.tree_map(lambda x: x[0], batch)
    loss_sum, denom, metrics, grads = loss_and_grad(
        state["params"], frozen, ref_params, first, jax.random.fold_in(step_rng, 0))
    if accum > 1:
      def body(carry, i):
        mb = jax.tree_util.tree_map(lambda x: x[i], batch)
        out = loss_and_grad(state["params"], frozen, ref_params, mb,
                            jax.random.fold_in(step_rng, i))
        return _add(carry, out), None
      (loss_sum, denom, metrics, grads), _ = jax.lax.scan(
          body, (loss_sum, denom, metrics, grads), jnp.arange(1, accum))
    denom = jnp.maximum(denom, 1e-9)
    grads = jax.tree_util.tree_map(lambda g: g / denom.astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    if update_scale_fn is not None:  # e.g. Half Fine-Tuning's per-round freeze multipliers
      scale = update_scale_fn(state["step"])
      updates = jax.tree_util.tree_map(lambda u, s: u * s, updates, scale)
    params = optax.apply_updates(state["params"], updates)
    loss = loss_sum / denom
    metrics = dict(metrics)
    metrics.update(
        train_loss=(loss, 1.0), grad_norm=(optax.tree.norm(grads), 1.0),
        lr=(sched(state["step"]), 1.0), tokens=(denom, 1.0))
    new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1, rng=rng)
    return new_state, metrics

  return step


def make_eval_step(model, objective_fn: Callable, obj_cfg):
  """Sums (loss_sum, denom) and metric pairs over one eval batch [B, ...] (no accumulation)."""

  def step(params, frozen, batch, ref_params=None):
    ctx = ObjectiveContext(model=model, config=obj_cfg, ref_params=ref_params, train=False)
    (loss_sum, denom), metrics = objective_fn(merge_params(params, frozen), batch,
                                              jax.random.key(0), ctx)
    return dict(metrics, eval_loss=(loss_sum, denom))
  return step


def finalize_metrics(metrics: dict) -> dict:
  """(sum, count) pairs -> floats on host (one device->host transfer for the whole dict)."""
  host = jax.device_get(metrics)
  out = {}
  for k, v in host.items():
    if isinstance(v, (tuple, list)):
      s, c = v
      out[k] = float(s) / max(float(c), 1e-9)
    else:
      out[k] = float(v)
  return out
