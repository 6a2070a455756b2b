"""Reward model: the decoder with a scalar head read at the last non-pad token.

Layout is Hugging Face's `AutoModelForSequenceClassification` with num_labels=1: the backbone's
params are the decoder's (no lm_head) plus `score.kernel` [hidden, 1] (HF `score.weight` [1, hidden],
no bias). The score is read where HF reads it: the last position whose token is real (here
segment_ids > 0; HF uses input_ids != pad_token_id, so keep pad ids out of the sequences).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.models.transformer import Decoder


class RewardModel(Decoder):
  """tokens [B, T] -> rewards [B] float32 (or per-position scores [B, T] with all_positions)."""

  def setup(self):
    super().setup()
    self.score = nn.Dense(
        1, use_bias=False, dtype=jnp.float32, param_dtype=self.cfg.weight_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", None)),
        name="score")

  def __call__(self, tokens: jax.Array, positions: Optional[jax.Array] = None,
               segment_ids: Optional[jax.Array] = None, all_positions: bool = False):
    h = super().__call__(tokens, positions=positions, segment_ids=segment_ids, return_hidden=True)
    scores = self.score(h.astype(jnp.float32))[..., 0]  # [B, T]
    if all_positions:
      return scores
    return gather_last(scores, segment_ids)


def last_index(segment_ids: Optional[jax.Array], length: int, batch: int) -> jax.Array:
  """[B] index of the last real token (segment_ids > 0); length - 1 without segment ids."""
  if segment_ids is None:
    return jnp.full((batch,), length - 1, jnp.int32)
  t = jnp.arange(length, dtype=jnp.int32)
  return jnp.max(jnp.where(segment_ids > 0, t, 0), axis=-1)


def gather_last(scores: jax.Array, segment_ids: Optional[jax.Array]) -> jax.Array:
  b, t = scores.shape
  idx = last_index(segment_ids, t, b)
  return jnp.take_along_axis(scores, idx[:, None], axis=-1)[:, 0]


def as_reward_model(model) -> RewardModel:
  """The reward model for a decoder module (same config), or the module itself."""
  return model if isinstance(model, RewardModel) else RewardModel(model.cfg)


def init_score(rng, hidden_size: int, dtype=jnp.float32) -> dict:
  """A fresh {'kernel': [hidden, 1]} score head, to add to pretrained decoder params."""
  return {"kernel": (0.02 * jax.random.normal(rng, (hidden_size, 1))).astype(dtype)}
