"""ftjax.hostmem: XLA:CPU's per-run buffer is faulted in as huge pages, and `ftjax` sets it up."""

import json
import os
import sys

import pytest

from conftest import run_python
from ftjax import hostmem

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables")

# 128 MiB of temporaries that XLA cannot fuse away; runs are dispatched back to back, as train
# steps are, so they start (and allocate) on XLA's worker threads.
_FAULTS = """
import resource
import jax, jax.numpy as jnp
def g(x):
  a = jax.lax.optimization_barrier(x * 2.0)
  b = jax.lax.optimization_barrier(jnp.sin(a))
  return (a * b).sum(axis=0)
f = jax.jit(g)
x = jnp.ones((4096, 4096), jnp.float32)
jax.block_until_ready([f(x) for _ in range(3)])
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
jax.block_until_ready([f(x) for _ in range(8)])
print("RESULT", (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 8)
"""


def _faults(env):
  r = run_python(_FAULTS, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  return float([l for l in r.stdout.splitlines() if l.startswith("RESULT ")][-1].split()[1])


def _thp_mode():
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return f.read().split("[")[1].split("]")[0]
  except (OSError, IndexError):
    return "never"


def test_tuned_env_adds_the_tunable_once_and_respects_the_user():
  env = hostmem.tuned_env({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0", "A": "1"},
                         accelerator=False)
  if not sys.platform.startswith("linux"):
    assert env is None
    return
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1"
  assert env["A"] == "1"
  assert hostmem.tuned_env(env) is None  # second pass (after the re-exec): nothing to do
  assert hostmem.tuned_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # user's wins
  assert hostmem.tuned_env({"FTJAX_MALLOC_TUNING": "0"}) is None
  # XLA:CPU only: a GPU/TPU plugin keeps glibc's defaults unless JAX_PLATFORMS=cpu.
  assert hostmem.tuned_env({}, accelerator=True) is None
  assert hostmem.tuned_env({"JAX_PLATFORMS": "cuda"}, accelerator=True) is None
  assert hostmem.tuned_env({"JAX_PLATFORMS": "cpu"}, accelerator=True) is not None
  assert hostmem.tuned_env({}, accelerator=False) is not None


@linux_only
def test_huge_pages_cut_the_per_run_faults():
  if _thp_mode() != "madvise":
    pytest.skip(f"transparent huge pages are {_thp_mode()!r} here (the tunable needs 'madvise')")
  pages = 128 * 2 ** 20 // 4096
  default = _faults({"GLIBC_TUNABLES": ""})
  tuned = _faults(hostmem.tuned_env({**os.environ, "GLIBC_TUNABLES": ""}, accelerator=False))
  if default < pages / 2:
    pytest.skip(f"glibc defaults fault only {default:.0f} pages per run here")
  # Default: the buffers are mapped afresh each run (>= 32768 4-KiB faults); tuned: 2-MiB pages.
  assert tuned < pages / 16, (default, tuned)


@linux_only
def test_cli_entry_reexecs_once_with_the_tunable():
  code = """
import os, sys
print("TUNABLES", os.environ.get("GLIBC_TUNABLES"), flush=True)
import ftjax.cli
sys.argv = ["ftjax", "--help"]
ftjax.cli.entry()
"""
  r = run_python(code, env={"GLIBC_TUNABLES": "", "FTJAX_MALLOC_TUNING": "1"})
  lines = [l for l in r.stdout.splitlines() if l.startswith("TUNABLES")]
  assert lines == ["TUNABLES ", "TUNABLES glibc.malloc.hugetlb=1"], r.stdout + r.stderr
  assert "ftjax train" in r.stdout and r.returncode == 0
  off = run_python(code, env={"GLIBC_TUNABLES": "", "FTJAX_MALLOC_TUNING": "0"})
  assert [l for l in off.stdout.splitlines() if l.startswith("TUNABLES")] == ["TUNABLES "]


@linux_only
def test_train_loop_run_from_python_says_how_to_get_it(tmp_path):
  r = run_python(f"""
from ftjax import train
from ftjax.config import load_config
c = load_config("configs/sft_tiny.py:steps=1")
c.model.hidden_size, c.model.intermediate_size, c.model.num_layers = 32, 64, 1
c.eval.every, c.train.batch_size, c.train.seq_len = 0, 4, 32
train.run(c, {str(tmp_path)!r})
""", env={"GLIBC_TUNABLES": "", "FTJAX_MALLOC_TUNING": "1"})
  assert r.returncode == 0, r.stderr[-2000:]
  assert "host memory: glibc default; export GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in r.stdout
