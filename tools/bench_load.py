"""Load time and peak host memory: ftjax.models.hf.load_hf vs transformers.from_pretrained.

  python tools/bench_load.py --dir /tmp/llama1b --out bench_load.json [--size 1b|tiny]

Writes (once; reused if present) a random-weight Llama-shaped checkpoint (1b: Llama-3.2-1B
shapes, 1.24B params, tied embeddings, bf16 = 2.47 GB) straight from numpy, tensor by tensor,
in 2 GB safetensors shards. Then each loader runs in its own fresh subprocess (so neither
sees the other's allocations), each `--repeats` times, alternating:
  ftjax:        load_hf(dir, param_dtype=bfloat16), all arrays ready on the default device
  transformers: AutoModelForCausalLM.from_pretrained(dir, dtype=torch.bfloat16)
Time is until every weight has been read: transformers may return mmap-backed weights that are
read lazily, so its child then touches each parameter ("returned" = when from_pretrained
returned). Files are read once before each child, so both start from a warm page cache.
Peak RSS is the child's ru_maxrss (includes file pages it mapped); "after imports" is RSS
before loading, so peak - that = what the load itself needed. The goal is
peak <= 1.3 x checkpoint size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

SIZES = {
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
               num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64),
    "tiny": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64),
}


def write_checkpoint(path: str, size: str):
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  from ftjax.models import hf_io  # pylint: disable=g-import-not-at-top
  s = SIZES[size]
  d, f, n = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
  q, kv = s["num_attention_heads"] * s["head_dim"], s["num_key_value_heads"] * s["head_dim"]
  entries = [("model.embed_tokens.weight", (s["vocab_size"], d)), ("model.norm.weight", (d,))]
  for i in range(n):
    p = f"model.layers.{i}."
    entries += [(p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,)),
                (p + "self_attn.q_proj.weight", (q, d)), (p + "self_attn.k_proj.weight", (kv, d)),
                (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, q)),
                (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                (p + "mlp.down_proj.weight", (d, f))]
  entries.sort()
  bf16 = np.dtype(ml_dtypes.bfloat16)
  rng = np.random.default_rng(0)

  def produce():  # one tensor at a time, never the whole model
    for name, shape in entries:
      if len(shape) == 1:
        yield np.ones(shape, bf16)
      else:
        yield (rng.standard_normal(shape, np.float32) * 0.02).astype(bf16)

  os.makedirs(path, exist_ok=True)
  hf_io.write_checkpoint(path, [(n_, bf16, s_) for n_, s_ in entries], produce(), 2 << 30)
  cfg = dict(s, model_type="llama", architectures=["LlamaForCausalLM"], tie_word_embeddings=True,
             max_position_embeddings=8192, rms_norm_eps=1e-5, hidden_act="silu",
             rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
             dtype="bfloat16")
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(cfg, fh, indent=2)


def checkpoint_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
             if f.endswith(".safetensors"))


def _rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(kind: str, path: str):
  """Runs in a subprocess: imports, then loads; prints one JSON line."""
  if kind == "ftjax":
    import jax  # pylint: disable=g-import-not-at-top
    from ftjax.models import hf  # pylint: disable=g-import-not-at-top
    base = _rss_mb()
    t = time.perf_counter()
    _, params = hf.load_hf(path, param_dtype="bfloat16")
    jax.block_until_ready(params)
    secs = lazy_secs = time.perf_counter() - t
  else:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    base = _rss_mb()
    t = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    lazy_secs = time.perf_counter() - t
    # transformers may leave weights as lazily-read mmap views; touching every weight makes
    # the time and RSS comparable with a loader that has read them all.
    with torch.no_grad():
      for p in model.parameters():
        p.view(torch.int16).sum()
    secs = time.perf_counter() - t
    del model
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
  print(json.dumps({"loader": kind, "seconds": secs, "seconds_until_returned": lazy_secs,
                    "rss_after_imports_mb": base, "peak_rss_mb": peak}))


def _warm_cache(path: str):
  """Reads the files once so both loaders start from the page cache, not the disk."""
  for f in sorted(os.listdir(path)):
    with open(os.path.join(path, f), "rb", buffering=0) as fh:
      while fh.read(64 << 20):
        pass


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--dir", default="/tmp/ftjax_bench_llama1b")
  ap.add_argument("--size", default="1b", choices=sorted(SIZES))
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--out", default="bench_load.json")
  ap.add_argument("--child", choices=("ftjax", "transformers"), help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.child:
    return child(a.child, a.dir)
  if not os.path.exists(os.path.join(a.dir, "config.json")):
    t = time.perf_counter()
    write_checkpoint(a.dir, a.size)
    print(f"wrote {a.dir} in {time.perf_counter() - t:.1f}s")
  ck_mb = checkpoint_bytes(a.dir) / 2**20
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  runs = []
  for _ in range(a.repeats):
    for kind in ("ftjax", "transformers"):
      _warm_cache(a.dir)
      out = subprocess.run([sys.executable, __file__, "--child", kind, "--dir", a.dir],
                           capture_output=True, text=True, env=env, check=False)
      if out.returncode:
        raise SystemExit(f"{kind} load failed:\n{out.stderr[-3000:]}")
      runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
  rows = []
  for kind in ("ftjax", "transformers"):
    rs = [r for r in runs if r["loader"] == kind]
    peak = max(r["peak_rss_mb"] for r in rs)
    base = min(r["rss_after_imports_mb"] for r in rs)
    rows.append(dict(loader=kind, seconds_best=min(r["seconds"] for r in rs),
                     seconds_until_returned_best=min(r["seconds_until_returned"] for r in rs),
                     seconds_all=[round(r["seconds"], 2) for r in rs], peak_rss_mb=peak,
                     rss_after_imports_mb=base, peak_over_checkpoint=peak / ck_mb,
                     load_increment_over_checkpoint=(peak - base) / ck_mb))
  result = {"checkpoint_dir": a.dir, "size": a.size, "checkpoint_mb": ck_mb,
            "goal_peak_over_checkpoint": 1.3, "host_cpus": os.cpu_count(), "results": rows}
  print(f"checkpoint: {ck_mb:.0f} MiB ({a.size}, bf16)")
  print(f"{'loader':<13}{'best s':>8}{'(returned)':>11}{'peak RSS MiB':>14}{'peak/ckpt':>11}"
        f"{'(peak-imports)/ckpt':>21}")
  for r in rows:
    print(f"{r['loader']:<13}{r['seconds_best']:>8.2f}{r['seconds_until_returned_best']:>11.2f}"
          f"{r['peak_rss_mb']:>14.0f}"
          f"{r['peak_over_checkpoint']:>11.2f}{r['load_increment_over_checkpoint']:>21.2f}")
  with open(a.out, "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
