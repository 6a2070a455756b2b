"""The benchmark scripts still run: every implementation of tools/bench_peft.py on a tiny shape.

No timing is asserted (timings belong to the bench output, not to tests); this only keeps the
scripts from rotting between the sessions that run them in full.
"""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_bench_peft_runs_every_impl(tmp_path):
  out = tmp_path / "peft.json"
  env = dict(os.environ, BENCH_PEFT_SMOKE="1", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "tools/bench_peft.py", "--memory-only", "--steps", "1", "--out", str(out)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(out.read_text())
  assert set(got["impls"]) == {"full", "lora", "dora", "qlora", "frozen", "hf_peft_lora"}
  for impl, rec in got["impls"].items():
    assert rec["tokens_per_s"] > 0 and rec["peak_rss_mb"] > 0, impl
  # Trainable counts: LoRA's adapters only; "frozen" trains the norm scales alone.
  assert got["impls"]["lora"]["trainable"] == got["impls"]["hf_peft_lora"]["trainable"]
  assert got["impls"]["frozen"]["trainable"] < got["impls"]["lora"]["trainable"]
  assert got["impls"]["qlora"]["linear_base_frac"] < 0.16
