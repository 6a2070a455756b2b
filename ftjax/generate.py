"""Greedy decoding (for held-out exact-match eval and, later, RL rollouts).

No KV cache yet: each new token re-runs the decoder over a fixed [B, P + A] buffer, so shapes are
static and one jit serves the whole eval. Fine for the short answers of eval tasks.
"""

from __future__ import annotations

import functools
from typing import List, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _greedy(model, params, prompt, prompt_valid, max_new_tokens: int):
  b, p = prompt.shape
  buf = jnp.concatenate([prompt, jnp.zeros((b, max_new_tokens), prompt.dtype)], axis=1)
  valid = jnp.concatenate([prompt_valid, jnp.ones((b, max_new_tokens), bool)], axis=1)
  segment_ids = valid.astype(jnp.int32)  # left padding is segment 0
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)

  def body(i, buf):
    logits = model.apply({"params": params}, buf, positions=positions, segment_ids=segment_ids)
    nxt = jnp.argmax(logits[:, p + i - 1], axis=-1).astype(buf.dtype)
    return jax.lax.dynamic_update_slice(buf, nxt[:, None], (0, p + i))

  buf = jax.lax.fori_loop(0, max_new_tokens, body, buf)
  return buf[:, p:]


def greedy_generate(model, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    eos_id: int, pad_id: int = 0, batch_size: int = 64) -> List[List[int]]:
  """Token ids of greedy completions (up to and excluding eos) for each prompt."""
  out: List[List[int]] = []
  p = max(len(x) for x in prompts)
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    n = len(chunk)
    chunk += [chunk[-1]] * (batch_size - n)  # fixed shape -> one compilation
    toks = np.full((batch_size, p), pad_id, np.int32)
    valid = np.zeros((batch_size, p), bool)
    for i, x in enumerate(chunk):
      toks[i, p - len(x):] = x
      valid[i, p - len(x):] = True
    gen = np.asarray(_greedy(model, params, jnp.asarray(toks), jnp.asarray(valid),
                             max_new_tokens))
    for row in gen[:n].tolist():
      out.append(row[:row.index(eos_id)] if eos_id in row else row)
  return out
