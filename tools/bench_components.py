"""Forward + backward time of each piece of the SFT bench model: ftjax vs torch, one at a time.

  python tools/bench_components.py [--rounds 3] [--out bench_out/components.json]

Where bench_sft.py times whole train steps, this splits one step into its parts on the same
shapes (Llama hidden 512, MLP 1408, 8/4 heads, seq 512, batch 4, vocab 8192, float32):

  mlp        SwiGLU MLP of one layer (gate/up/down, weight gradients included)
  proj       q/k/v/o projections of one layer (weight gradients included)
  attention  causal GQA attention core of one layer (ftjax's default on CPU, the native kernel of
             models/flash_cpu.py, vs torch SDPA + repeat_kv)
  head_ce    LM head + float32 cross-entropy (weight gradient included)

ftjax runs its own code paths (`layers.matmul` / `head_matmul`, `layers.swiglu`,
`attention.attend`, `objectives.common.token_logps`); torch runs what HF Llama runs. Each
implementation runs in a fresh subprocess, alternating round by round; medians of the per-round
medians. The ftjax child gets `ftjax train`'s huge-page setting (ftjax.hostmem), torch glibc's
defaults.
Measured (2-core Zen 3 CPU, 5 rounds): ftjax vs torch ms: mlp 156.8 vs 159.2, proj 56.7 vs 57.5,
attention 28.4 vs 62.9 (native kernel; the XLA flash path measured 77.4 vs 71.6 in an earlier,
slower hour), head_ce 328.2 vs 410.3 (README, SFT throughput, has older runs too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from bench_sft import BENCH  # tools/ is on sys.path
from benchlib import interleaved, spawn, write_json

PARTS = ("mlp", "proj", "attention", "head_ce")


def _median_ms(fn, reps: int) -> float:
  fn()
  fn()  # compile / warm-up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def run_ftjax(reps: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ftjax.models import attention as attn, layers  # pylint: disable=g-import-not-at-top
  from ftjax.objectives.common import token_logps  # pylint: disable=g-import-not-at-top
  b = BENCH
  bsz, t, d, f, v = b["batch_size"], b["seq_len"], b["hidden_size"], b["intermediate_size"], \
      b["vocab_size"]
  n, kv = b["num_heads"], b["num_kv_heads"]
  h = d // n
  keys = iter(jax.random.split(jax.random.key(0), 16))
  rnd = lambda *shape, s=1.0: jax.random.normal(next(keys), shape, jnp.float32) * s
  x, dy = rnd(bsz, t, d), rnd(bsz, t, d)
  tgt = jax.random.randint(next(keys), (bsz, t), 0, v)

  def mlp(x, wg, wu, wd):
    return jnp.sum(layers.matmul(layers.swiglu(layers.matmul(x, wg), layers.matmul(x, wu)), wd)
                   * dy)

  def proj(x, wq, wk, wv, wo):
    q, k, vv = layers.matmul(x, wq), layers.matmul(x, wk), layers.matmul(x, wv)
    return jnp.sum(layers.matmul(q + jnp.concatenate([k, vv], -1), wo) * dy)

  do = rnd(bsz, t, n, h)

  def attention(q, k, vv):  # what the model runs by default: the native kernel when it applies
    return jnp.sum(attn.attend(q, k, vv, None, h ** -0.5, None, None) * do)

  def head_ce(x, wh):
    logps = token_logps(layers.head_matmul(x, wh).astype(jnp.float32), tgt)
    logps = logps[0] if isinstance(logps, tuple) else logps
    return -jnp.mean(logps)

  cases = {
      "mlp": (mlp, (x, rnd(d, f, s=0.02), rnd(d, f, s=0.02), rnd(f, d, s=0.02))),
      "proj": (proj, (x, rnd(d, d, s=0.02), rnd(d, kv * h, s=0.02), rnd(d, kv * h, s=0.02),
                      rnd(d, d, s=0.02))),
      "attention": (attention, (rnd(bsz, t, n, h), rnd(bsz, t, kv, h), rnd(bsz, t, kv, h))),
      "head_ce": (head_ce, (x, rnd(d, v, s=0.02))),
  }
  out = {}
  for name, (loss, args) in cases.items():
    grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
    out[name] = _median_ms(lambda g=grad, a=args: jax.block_until_ready(g(*a)), reps)
  return out


def run_torch(reps: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  b = BENCH
  bsz, t, d, f, v = b["batch_size"], b["seq_len"], b["hidden_size"], b["intermediate_size"], \
      b["vocab_size"]
  n, kv = b["num_heads"], b["num_kv_heads"]
  h = d // n
  lin = lambda i, o: torch.nn.Linear(i, o, bias=False)
  x = torch.randn(bsz, t, d, requires_grad=True)
  dy = torch.randn(bsz, t, d)
  gate, up, down = lin(d, f), lin(d, f), lin(f, d)
  wq, wk, wv, wo = lin(d, d), lin(d, kv * h), lin(d, kv * h), lin(d, d)
  q = torch.randn(bsz, n, t, h, requires_grad=True)
  k = torch.randn(bsz, kv, t, h, requires_grad=True)
  vv = torch.randn(bsz, kv, t, h, requires_grad=True)
  do = torch.randn(bsz, n, t, h)
  head = lin(d, v)
  tgt = torch.randint(0, v, (bsz * t,))
  params = [x, q, k, vv, *(m.weight for m in (gate, up, down, wq, wk, wv, wo, head))]

  def step(fn):
    def one():
      for p in params:
        p.grad = None
      fn()
    return one

  def mlp():
    (down(F.silu(gate(x)) * up(x)) * dy).sum().backward()

  def proj():
    (wo(wq(x) + torch.cat([wk(x), wv(x)], -1)) * dy).sum().backward()

  def attention():  # HF repeat_kv + SDPA, as LlamaAttention runs it
    rep = n // kv
    o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1),
                                       is_causal=True, scale=h ** -0.5)
    (o * do).sum().backward()

  def head_ce():
    F.cross_entropy(head(x).float().view(-1, v), tgt).backward()

  return {name: _median_ms(step(fn), reps) for name, fn in
          dict(mlp=mlp, proj=proj, attention=attention, head_ce=head_ce).items()}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--out", default="bench_out/components.json")
  ap.add_argument("--child", default=None)
  args = ap.parse_args()
  if args.child:
    fn = {"ftjax": run_ftjax, "torch": run_torch}[args.child]
    print("RESULT " + json.dumps(fn(args.reps)), flush=True)
    return
  rows = interleaved(["ftjax", "torch"], args.rounds,
                     lambda i: spawn(__file__, "--child", i, "--reps", str(args.reps),
                                     ftjax=i == "ftjax"))
  result = {"bench": BENCH, "rounds": args.rounds, "ms": {}, "runs": rows}
  print(f"{'part':<11}{'ftjax ms':>10}{'torch ms':>10}{'torch/ftjax':>13}")
  for part in PARTS:
    ms = {impl: statistics.median(r[part] for r in rs) for impl, rs in rows.items()}
    result["ms"][part] = ms
    print(f"{part:<11}{ms['ftjax']:>10.1f}{ms['torch']:>10.1f}{ms['torch'] / ms['ftjax']:>12.2f}x")
  write_json(args.out, result)


if __name__ == "__main__":
  main()
