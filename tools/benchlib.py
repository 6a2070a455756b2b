"""Shared pieces of the tools/bench_*.py scripts: the HF baseline model, matmul peak, memory."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
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


def timed(one, steps: int) -> dict:
  """Runs one() once (compile / warm-up), then `steps` timed times; median step seconds."""
  t0 = time.perf_counter()
  one()
  first = time.perf_counter() - t0
  times = []
  loss = None
  for _ in range(steps):
    t0 = time.perf_counter()
    loss = one()
    times.append(time.perf_counter() - t0)
  return dict(step_s=statistics.median(times), compile_s=first, peak_rss_mb=peak_rss_mb(),
              loss=float(loss))


def spawn(script: str, *args: str, ftjax: bool = False) -> dict:
  """Runs `python script *args` in a fresh process (its own peak RSS); parses its RESULT line.

  A child that runs ftjax gets the host-malloc setting `ftjax train` applies (ftjax.hostmem);
  torch-only children keep glibc's defaults, as their users run them; those are also torch's
  best (SFT bench torch step: 2.95 s default, 3.48 s with huge pages, which it allocates and
  frees per op)."""
  env = None
  if ftjax:
    from ftjax import hostmem  # pylint: disable=g-import-not-at-top
    env = hostmem.tuned_env()
  out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                       check=False, env=env)
  for line in out.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[7:])
  raise RuntimeError(f"{script} {' '.join(args)} failed:\n{out.stderr[-3000:]}")


def interleaved(impls, rounds: int, run_one, log: bool = False) -> dict:
  """{impl: [run_one(impl) per round]}, the order reversed every other round so that no
  implementation always runs first (the machine's load drifts between minutes)."""
  rows = {i: [] for i in impls}
  for r in range(rounds):
    for impl in (impls if r % 2 == 0 else impls[::-1]):
      rows[impl].append(run_one(impl))
      if log:
        print(f"round {r} {impl}: {rows[impl][-1]}", flush=True)
  return rows


def write_json(path: str, result: dict):
  """Writes a bench's result JSON, creating its folder."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
