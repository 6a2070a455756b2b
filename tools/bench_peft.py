"""PEFT train-step throughput and memory: ftjax full FT / LoRA / DoRA / QLoRA vs HF PEFT LoRA.

  python tools/bench_peft.py [--rounds 3] [--steps 2] [--out bench_out/peft.json]
  python tools/bench_peft.py --preset weights --impls full,lora,qlora --memory-only \
      --out bench_out/peft_mem.json      # peak memory where weights dominate

Bench model (tools/bench_sft.py's): Llama, hidden 512, 8 layers, 8/4 heads, MLP 1408, vocab 8192,
seq 512, batch 4, float32, AdamW; LoRA r 16 / alpha 32 on every linear layer. Peak RSS comes
from one fresh subprocess per implementation. Throughput comes from one process holding every
implementation (torch and JAX side by side), timed block by block in rotating order over
`rounds`, medians of rounds * steps step times: on a shared machine whose load drifts by 2-3x
between minutes, only interleaving at this grain keeps the ratios meaningful. That process keeps
glibc's defaults (huge pages slow torch), so its ftjax runs lack `ftjax train`'s host-memory
setting (ftjax.hostmem: the LoRA step 3-4% faster); the isolated memory runs of ftjax get it.
"weights MB" is the bytes of all params (NF4 kernels included); "linear base %" is the NF4
linear kernels' bytes over their float32 bytes.
"frozen" is no method: every weight frozen and no adapter, only the norm scales train, so the
step is the forward pass plus the input-gradient backward through every layer, without weight
gradients. It is the ceiling of any LoRA in ftjax (LoRA = this + the adapters' own work).
Measured (2-core Zen 3 CPU, native attention kernel): ftjax LoRA 872 tok/s, HF PEFT LoRA 823
(1.06x), frozen 1028 (1.25x PEFT: the ceiling of any LoRA here), full FT 629. Between runs PEFT
moved 634-823 tok/s; LoRA / PEFT read 0.93-1.18x over two sessions.
Memory preset (weights dominate): LoRA peak RSS 35% of full FT, QLoRA 26%.
LoRA needs no weight gradients, so its matmul floor is ~4 * N * tokens FLOPs (vs 6 for full FT).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from benchlib import hf_llama, peak_rss_mb, spawn, write_json  # tools/ is on sys.path

BENCH = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=8,
             num_heads=8, num_kv_heads=4, seq_len=512, batch_size=4)
IMPLS = ("full", "lora", "dora", "qlora", "frozen", "hf_peft_lora")
RANK = 16
if os.environ.get("BENCH_PEFT_SMOKE"):  # a seconds-long run of every code path
  BENCH.update(num_layers=2, seq_len=64, batch_size=2, vocab_size=512)
# --preset weights: a model whose weights dominate memory (1B-class widths, few layers, short
# rows), for issue #4's "LoRA peak memory <= 40% of full FT": 319M params, 1.2 GiB in float32.
PRESETS = {"weights": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_layers=4, num_heads=16, num_kv_heads=8, seq_len=128,
                           batch_size=1)}
if os.environ.get("BENCH_PEFT_PRESET"):
  BENCH.update(PRESETS[os.environ["BENCH_PEFT_PRESET"]])


def _nbytes(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def _leafwise_init(model, leaf_fn=None):
  """Random base weights created one leaf at a time, like a checkpoint streamed in leaf by leaf
  (`leaf_fn` as in `ftjax.models.hf.load_hf`: QLoRA quantises each kernel as it arrives).

  Why: one jitted `model.init` holds XLA temporaries (RNG bits) for all leaves at once, ~2.4x the
  weights at its peak on the memory preset; a fine-tuning run loads its base from a checkpoint
  instead, so that transient would measure the benchmark's init, not training. Norm scales are
  ones, every other leaf N(0, 0.02) (the loss value is irrelevant here).
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  abstract = jax.eval_shape(
      lambda r: nn.unbox(model.init(r, jnp.zeros((1, 8), jnp.int32)))["params"], jax.random.key(0))
  out = {}
  for i, (path, sd) in enumerate(traverse_util.flatten_dict(abstract).items()):
    if path[-1] == "scale":
      arr = jnp.ones(sd.shape, sd.dtype)
    else:
      arr = jax.jit(lambda k, sd=sd: 0.02 * jax.random.normal(k, sd.shape, sd.dtype))(
          jax.random.key(i))
    res = arr if leaf_fn is None else leaf_fn(path, arr)
    del arr
    if isinstance(res, dict):
      out.update({path[:-1] + (k,): v for k, v in res.items()})
    else:
      out[path] = res
  return traverse_util.unflatten_dict(out), abstract


def build_ftjax(method: str):
  """(one_step() -> blocks until done, info) for an ftjax train step of `method`."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ftjax import objectives, peft  # pylint: disable=g-import-not-at-top
  from ftjax.models import Decoder, ModelConfig  # pylint: disable=g-import-not-at-top
  from ftjax.train.optim import make_optimizer  # pylint: disable=g-import-not-at-top
  from ftjax.train.step import make_train_step  # pylint: disable=g-import-not-at-top
  b = BENCH
  # Unrolled layer scan for speed (as bench_sft); the memory preset keeps the default rolled scan,
  # which slices one layer's weights at a time instead of all of them.
  unroll = 1 if os.environ.get("BENCH_PEFT_PRESET") else b["num_layers"]
  cfg = ModelConfig(**{k: v for k, v in b.items() if k not in ("seq_len", "batch_size")},
                    norm_eps=1e-6, scan_unroll=unroll)
  pc = ml_collections.ConfigDict(dict(method="none" if method in ("full", "frozen") else method,
                                      r=RANK, alpha=2.0 * RANK))
  base_cfg, cfg = cfg, peft.apply_peft(cfg, pc)
  leaf_fn = peft.tree.nf4_leaf_fn(cfg) if cfg is not base_cfg else None
  params, abstract = _leafwise_init(Decoder(base_cfg), leaf_fn)
  linear_fp32 = sum(_nbytes(d["kernel"]) for _, d in peft.tree.linear_dicts(abstract))
  model = Decoder(cfg)
  params = peft.init_adapters(params, model, jax.random.key(1), jnp.zeros((1, 8), jnp.int32),
                              donate=True)
  linear_bytes = sum(_nbytes({k: v for k, v in d.items() if k.startswith("kernel")})
                     for _, d in peft.tree.linear_dicts(params))
  weights = _nbytes(params)
  if method == "frozen":  # only the norm scales train: the backward still runs through every layer
    mask = jax.tree_util.tree_map_with_path(lambda p, _: str(p[-1].key) == "scale", params)
  else:
    mask = peft.trainable_mask(params, pc)
  trainable, frozen = peft.split_trainable(params, mask)
  del params
  tx, sched = make_optimizer(ml_collections.ConfigDict(
      dict(lr=1e-4, weight_decay=0.0, schedule="constant", grad_clip_norm=1.0)), 100)
  step = jax.jit(make_train_step(model, objectives.get("sft"), ml_collections.ConfigDict(),
                                 tx, sched), donate_argnums=(0,))
  rng = np.random.default_rng(0)
  toks = rng.integers(0, b["vocab_size"], (1, b["batch_size"], b["seq_len"] + 1)).astype(np.int32)
  batch = {"tokens": jnp.asarray(toks[..., :-1]), "targets": jnp.asarray(toks[..., 1:]),
           "loss_mask": jnp.ones(toks[..., 1:].shape, jnp.float32)}
  state = {"params": trainable, "opt_state": tx.init(trainable), "step": jnp.int32(0),
           "rng": jax.random.key(1)}
  n_train = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
  box = {"state": state}

  def one():
    box["state"], m = step(box["state"], frozen, batch)
    jax.block_until_ready(m)
    return float(m["train_loss"][0])
  return one, dict(trainable=int(n_train), weights_mb=weights / 2**20,
                   linear_base_frac=linear_bytes / linear_fp32)


def build_hf_peft():
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  b = BENCH
  model = hf_llama(b)
  model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK,
                                                     target_modules="all-linear")).train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
  g = torch.Generator().manual_seed(0)
  toks = torch.randint(0, b["vocab_size"], (b["batch_size"], b["seq_len"]), generator=g)

  def one():
    out = model(input_ids=toks, labels=toks)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(out.loss)
  weights = sum(p.numel() * p.element_size() for p in model.parameters())
  return one, dict(trainable=int(sum(p.numel() for p in params)), weights_mb=weights / 2**20,
                   linear_base_frac=1.0)


def build(impl: str):
  return build_hf_peft() if impl == "hf_peft_lora" else build_ftjax(impl)


def _timed(one, steps):
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    loss = one()
    times.append(time.perf_counter() - t0)
  return times, loss


def _child(impl: str, steps: int):
  """Separate process per implementation: its peak RSS is its own."""
  one, info = build(impl)
  t0 = time.perf_counter()
  one()
  compile_s = time.perf_counter() - t0
  times, loss = _timed(one, steps)
  res = dict(info, step_s=statistics.median(times), compile_s=compile_s,
             peak_rss_mb=peak_rss_mb(), loss=loss)
  print("RESULT " + json.dumps(res), flush=True)


def alternate(impls, rounds: int, steps: int) -> dict:
  """All implementations in one process, timed step-block by step-block in rotating order: on a
  shared machine whose load drifts, this keeps the ratios fair (memory is not measured here)."""
  built = {i: build(i) for i in impls}
  for one, _ in built.values():
    one()  # compile / warm up
  times = {i: [] for i in impls}
  for r in range(rounds):
    for impl in impls[r % len(impls):] + impls[:r % len(impls)]:
      times[impl].extend(_timed(built[impl][0], steps)[0])
  return {i: dict(step_s=statistics.median(t), times=t) for i, t in times.items()}


def _spawn(impls, *args) -> dict:
  # A process that runs HF PEFT keeps glibc's defaults (huge pages slow torch: it allocates per
  # op), so ftjax runs there without the setting `ftjax train` gives it.
  return spawn(__file__, "--child", *args, ftjax=not any(i.startswith("hf_") for i in impls))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=3, help="alternating throughput rounds")
  ap.add_argument("--steps", type=int, default=2, help="timed steps per impl per round")
  ap.add_argument("--impls", default=",".join(IMPLS))
  ap.add_argument("--out", default="bench_out/peft.json")
  ap.add_argument("--child", default=None)
  ap.add_argument("--preset", default=None, choices=sorted(PRESETS),
                  help="another model shape (children inherit it through the environment)")
  ap.add_argument("--memory-only", action="store_true",
                  help="only the isolated per-impl runs (peak RSS), no alternating timing")
  args = ap.parse_args()
  if args.preset and not args.child:
    os.environ["BENCH_PEFT_PRESET"] = args.preset
    BENCH.update(PRESETS[args.preset])
  impls = [i for i in args.impls.split(",") if i]
  if args.child == "alternate":
    print("RESULT " + json.dumps(alternate(impls, args.rounds, args.steps)), flush=True)
    return
  if args.child:
    return _child(args.child, args.steps)
  mem = {}
  for impl in impls:  # memory: one fresh process each (1 timed step)
    mem[impl] = _spawn([impl], impl, "--steps", "1")
    print(f"isolated {impl}: peak {mem[impl]['peak_rss_mb']:.0f} MB, "
          f"{mem[impl]['step_s']:.2f} s/step", flush=True)
  if args.memory_only:  # throughput from the isolated runs (one step each)
    speed = {i: dict(step_s=m["step_s"], times=[m["step_s"]]) for i, m in mem.items()}
  else:
    speed = _spawn(impls, "alternate", "--impls", ",".join(impls), "--rounds", str(args.rounds),
                   "--steps", str(args.steps))
  tokens = BENCH["batch_size"] * BENCH["seq_len"]
  result = {"bench": BENCH, "preset": args.preset, "rank": RANK, "rounds": args.rounds,
            "steps": args.steps, "load_avg": os.getloadavg(), "impls": {}}
  print(f"{'impl':<14}{'tokens/s':>10}{'step s':>9}{'compile s':>11}{'peak MB':>9}"
        f"{'weights MB':>12}{'trainable':>12}{'linear base %':>15}")
  for impl in impls:
    m, sp = mem[impl], speed[impl]
    rec = dict(tokens_per_s=tokens / sp["step_s"], step_s=sp["step_s"], step_times=sp["times"],
               compile_s=m["compile_s"], peak_rss_mb=m["peak_rss_mb"],
               weights_mb=m["weights_mb"], trainable=m["trainable"],
               linear_base_frac=m["linear_base_frac"], isolated_step_s=m["step_s"])
    result["impls"][impl] = rec
    print(f"{impl:<14}{rec['tokens_per_s']:>10.0f}{rec['step_s']:>9.2f}{rec['compile_s']:>11.1f}"
          f"{rec['peak_rss_mb']:>9.0f}{rec['weights_mb']:>12.1f}{rec['trainable']:>12,}"
          f"{100 * rec['linear_base_frac']:>14.1f}%")
  got = result["impls"]
  if "lora" in got and "hf_peft_lora" in got:
    result["lora_vs_hf_peft"] = got["lora"]["tokens_per_s"] / got["hf_peft_lora"]["tokens_per_s"]
    # Per round: each impl's best step of that round (blocks under a minute apart; a step hit by a
    # load spike says nothing about the code, and with 2 steps a median would be their mean).
    per = lambda impl: [min(got[impl]["step_times"][r * args.steps:(r + 1) * args.steps])
                        for r in range(len(got[impl]["step_times"]) // args.steps)]
    result["lora_vs_hf_peft_rounds"] = [p / l for l, p in zip(per("lora"), per("hf_peft_lora"))]
    rounds = ", ".join(f"{x:.2f}" for x in result["lora_vs_hf_peft_rounds"])
    print(f"ftjax LoRA / HF PEFT LoRA tokens/s: {result['lora_vs_hf_peft']:.2f}x (goal >= 1.5x; "
          f"per round: {rounds})")
  if "lora" in got and "full" in got:
    result["lora_vs_full_peak_mem"] = got["lora"]["peak_rss_mb"] / got["full"]["peak_rss_mb"]
    print(f"ftjax LoRA / full FT peak RSS: {result['lora_vs_full_peak_mem']:.0%}")
  write_json(args.out, result)


if __name__ == "__main__":
  main()
