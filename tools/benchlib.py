"""Shared pieces of the tools/bench_*.py scripts: the HF baseline model, matmul peak, memory."""

from __future__ import annotations

import os
import time


def peak_rss_mb() -> float:
  import resource  # pylint: disable=g-import-not-at-top
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak_flops(n: int = 2048, reps: int = 5) -> float:
  """Best-of-`reps` float32 FLOP/s of one large jnp.dot: the machine's practical matmul peak."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def hf_llama(b: dict):
  """transformers LlamaForCausalLM of the bench shape (torch CPU, all cores, SDPA attention)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  hf_cfg = transformers.LlamaConfig(
      vocab_size=b["vocab_size"], hidden_size=b["hidden_size"],
      intermediate_size=b["intermediate_size"], num_hidden_layers=b["num_layers"],
      num_attention_heads=b["num_heads"], num_key_value_heads=b["num_kv_heads"],
      max_position_embeddings=2048, rms_norm_eps=1e-6, attn_implementation="sdpa")
  torch.manual_seed(0)
  return transformers.LlamaForCausalLM(hf_cfg)
