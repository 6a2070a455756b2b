"""Supervised fine-tuning: next-token cross-entropy on completion tokens only."""

from __future__ import annotations

import jax.numpy as jnp

from ftjax.objectives import moe_aux, register
from ftjax.objectives.common import token_logps


@register("sft")
def sft(params, batch, rng, ctx):
  """batch: tokens/targets/loss_mask [B, T] (+ positions, segment_ids). Returns (sum, count)."""
  rng = rng if ctx.train else None  # dropout (e.g. LoRA's) only while training
  logits, aux = moe_aux.forward(ctx, params, batch, rng=rng)  # aux is None for dense models
  logp, correct = token_logps(logits, batch["targets"])
  mask = batch["loss_mask"].astype(jnp.float32)
  nll_sum = -(logp * mask).sum()
  count = mask.sum()
  metrics = {
      "loss": (nll_sum, count),
      "token_accuracy": ((correct * mask).sum(), count),
  }
  # MoE router losses (load balancing, z-loss) and metrics; no-op for dense models.
  loss_sum, metrics = moe_aux.add_terms(nll_sum, count, aux, ctx, metrics)
  return (loss_sum, count), metrics
