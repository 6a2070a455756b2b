"""Greedy decoding (held-out exact-match eval, and RL rollouts later).

The default decodes with a KV cache (`ModelConfig.decode_cache`): one forward over the
left-padded prompt fills the cache, then each new token is one single-token forward, all inside
one jit (a fori_loop over a fixed [B, P + A] cache, so shapes are static). `use_cache=False`
re-runs the decoder over the whole buffer per token instead (the reference the cache is tested
against: same tokens).
"""

from __future__ import annotations

import functools
from typing import List, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _greedy_cached(model, params, prompt, prompt_valid, max_new_tokens: int):
  b, p = prompt.shape
  dm = model.clone(cfg=model.cfg.replace(decode_cache=p + max_new_tokens))
  segment_ids = prompt_valid.astype(jnp.int32)  # left padding is segment 0
  positions = jnp.maximum(jnp.cumsum(prompt_valid, axis=1) - 1, 0).astype(jnp.int32)
  shapes = jax.eval_shape(lambda: dm.init(jax.random.key(0), prompt, positions=positions,
                                          segment_ids=segment_ids))["cache"]
  cache = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
  logits, variables = dm.apply({"params": params, "cache": cache}, prompt, positions=positions,
                               segment_ids=segment_ids, mutable=["cache"])
  first = jnp.argmax(logits[:, -1], axis=-1).astype(prompt.dtype)
  last_pos = positions[:, -1]
  ones = jnp.ones((b, 1), jnp.int32)

  def body(i, carry):
    cache, tok, out = carry
    out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
    logits, variables = dm.apply({"params": params, "cache": cache}, tok[:, None],
                                 positions=(last_pos + 1 + i)[:, None], segment_ids=ones,
                                 mutable=["cache"])
    return variables["cache"], jnp.argmax(logits[:, -1], axis=-1).astype(tok.dtype), out

  out = jnp.zeros((b, max_new_tokens), prompt.dtype)
  _, _, out = jax.lax.fori_loop(0, max_new_tokens, body, (variables["cache"], first, out))
  return out


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _greedy_full(model, params, prompt, prompt_valid, max_new_tokens: int):
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
                    eos_id: int, pad_id: int = 0, batch_size: int = 64,
                    use_cache=None) -> List[List[int]]:
  """Token ids of greedy completions (up to and excluding eos) for each prompt.

  use_cache None = the KV cache, except for MoE with capacity dispatch: its capacity (and so
  which tokens are dropped) depends on how many tokens one call routes, so single-token decode
  steps would not reproduce the full forward.
  """
  if use_cache is None:
    cfg = model.cfg
    use_cache = not (cfg.num_experts and cfg.moe_dispatch == "capacity")
  greedy = _greedy_cached if use_cache else _greedy_full
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
    gen = np.asarray(greedy(model, params, jnp.asarray(toks), jnp.asarray(valid),
                            max_new_tokens))
    for row in gen[:n].tolist():
      out.append(row[:row.index(eos_id)] if eos_id in row else row)
  return out
