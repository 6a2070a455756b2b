"""Supervised fine-tuning: next-token cross-entropy on completion tokens only."""

from __future__ import annotations

import jax.numpy as jnp

from ftjax.objectives import register
from ftjax.objectives.common import forward, token_logps


@register("sft")
def sft(params, batch, rng, ctx):
  """batch: tokens/targets/loss_mask [B, T] (+ positions, segment_ids). Returns (sum, count)."""
  del rng
  logits = forward(ctx.model, params, batch)
  logp, correct = token_logps(logits, batch["targets"])
  mask = batch["loss_mask"].astype(jnp.float32)
  nll_sum = -(logp * mask).sum()
  count = mask.sum()
  metrics = {
      "loss": (nll_sum, count),
      "token_accuracy": ((correct * mask).sum(), count),
  }
  return (nll_sum, count), metrics
