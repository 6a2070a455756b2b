"""MoE benchmark on CPU: block step time per dispatch path, and expert balance after training.

  python tools/bench_moe.py                     # both parts, markdown tables on stdout
  python tools/bench_moe.py --part block --tokens 2048 --iters 10
  python tools/bench_moe.py --part balance --steps 150

Part 1 (block): one MoE feed-forward block, E=8 experts, top-2, jitted forward+backward
(grads of every weight and of the input), for the dropless (sort + ragged_dot) and
capacity-factor (1.25, [E, C, D] buffers) paths, against a dense SwiGLU MLP with the same active
parameters (width k * F_expert). Median of --iters timed steps after a warm-up.
Part 2 (balance): configs/moe_tiny.py trained --steps steps on the shipped addition task with
and without the load-balancing loss; per-layer expert load at the end (max and min expert
share x E: 1.0 is perfect balance, 8.0 means one expert takes everything).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ftjax.models import ModelConfig  # noqa: E402  pylint: disable=wrong-import-position
from ftjax.models.layers import MLP  # noqa: E402  pylint: disable=wrong-import-position
from ftjax.models.moe import MoEBlock  # noqa: E402  pylint: disable=wrong-import-position


def _time_block(module, x, seg, iters: int):
  params = jax.jit(lambda: module.init(jax.random.key(0), x, seg)["params"])()
  params = nn.unbox(params)

  def loss(p, x):
    y = module.apply({"params": p}, x, seg)
    return jnp.mean(jnp.square(y.astype(jnp.float32)))
  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  jax.block_until_ready(step(params, x))  # compile + warm-up
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(step(params, x))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


class _Dense(nn.Module):
  cfg: ModelConfig
  width: int

  @nn.compact
  def __call__(self, x, seg):
    del seg
    return MLP(self.cfg, self.width, name="mlp")(x)


def bench_block(tokens: int, hidden: int, expert_width: int, iters: int):
  e, k = 8, 2
  b = max(tokens // 256, 1)
  t = tokens // b
  x = jax.random.normal(jax.random.key(1), (b, t, hidden), jnp.float32)
  seg = jnp.ones((b, t), jnp.int32)
  base = ModelConfig(hidden_size=hidden, intermediate_size=k * expert_width, num_experts=e,
                     num_experts_per_tok=k, moe_intermediate_size=expert_width)
  rows = []
  for name, module in (
      ("dense MLP (width k*F)", _Dense(base.replace(num_experts=0), k * expert_width)),
      ("MoE dropless (ragged_dot)", MoEBlock(base.replace(moe_dispatch="dropless"))),
      ("MoE capacity (cf 1.25)", MoEBlock(base.replace(moe_dispatch="capacity",
                                                       moe_capacity_factor=1.25))),
  ):
    sec = _time_block(module, x, seg, iters)
    rows.append(dict(path=name, ms=1e3 * sec, tokens_per_s=b * t / sec))
  return rows


def bench_balance(steps: int, dispatch: str):
  from ftjax import train  # pylint: disable=g-import-not-at-top
  from ftjax.config import load_config  # pylint: disable=g-import-not-at-top
  rows = []
  for aux in (0.0, 0.01):
    # capacity factor 2: (almost) nothing dropped, so routing is what the router wants.
    c = load_config(f"moe_tiny:steps={steps},aux={aux},dispatch={dispatch},capacity_factor=2.0")
    c.eval.update(dict(every=0, exact_match_examples=0))
    c.checkpoint.every = 0
    c.train.log_every = steps
    with tempfile.TemporaryDirectory() as wd:
      summary = train.run(c, wd)
    last = summary["last"]
    layers = sorted({k.split("/")[1] for k in last if k.startswith("moe_max_load/")})
    rows.append(dict(aux_coef=aux, train_loss=last["train_loss"], nll=last["loss"],
                     dropped=last["moe_dropped_frac"],
                     lb_loss=last["moe_lb_loss"],
                     max_load=[last[f"moe_max_load/{l}"] for l in layers],
                     min_load=[last[f"moe_min_load/{l}"] for l in layers]))
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--part", choices=("all", "block", "balance"), default="all")
  p.add_argument("--tokens", type=int, default=2048)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--expert_width", type=int, default=256)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--balance_dispatch", default="capacity",
                 help="dispatch for the balance runs (ragged_dot is slow on CPU, see README)")
  p.add_argument("--out", default="", help="also write the results as JSON here")
  a = p.parse_args(argv)
  out = {"device": str(jax.devices()[0]), "cpu_count": os.cpu_count()}
  if a.part in ("all", "block"):
    out["block"] = bench_block(a.tokens, a.hidden, a.expert_width, a.iters)
    print(f"\nMoE block fwd+bwd, {a.tokens} tokens, D={a.hidden}, E=8, k=2, "
          f"F_expert={a.expert_width} ({out['device']}, {os.cpu_count()} cores)")
    print("| path | ms / step | tokens / s |\n|---|---:|---:|")
    for r in out["block"]:
      print(f"| {r['path']} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} |")
  if a.part in ("all", "balance"):
    out["balance"] = bench_balance(a.steps, a.balance_dispatch)
    print(f"\nExpert load after {a.steps} steps of configs/moe_tiny.py (share x E per layer; 1 = "
          "balanced)")
    print("| moe_aux_coef | train NLL | lb loss | dropped | max load per layer | "
          "min load per layer |")
    print("|---:|---:|---:|---:|---|---|")
    for r in out["balance"]:
      fmt = lambda v: " ".join(f"{x:.2f}" for x in v)
      print(f"| {r['aux_coef']} | {r['nll']:.3f} | {r['lb_loss']:.3f} | {r['dropped']:.3f} | "
            f"{fmt(r['max_load'])} | "
            f"{fmt(r['min_load'])} |")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
