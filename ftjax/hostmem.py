"""Host memory for XLA:CPU training: back large malloc'd buffers with transparent huge pages.

XLA:CPU allocates one temporary buffer per executable run (all activations of a train step;
~830 MiB for the SFT bench model) with posix_memalign from a worker thread. glibc serves an
allocation that large from a fresh mmap (a thread's arena cannot hold it) and unmaps it on free,
so every step faults the whole buffer in again in 4 KiB pages: ~220k page faults and ~0.5 s of
kernel time per 2.7 s step on a 2-core machine (−7 to −11% step time once fixed). glibc's
`glibc.malloc.hugetlb=1` tunable (glibc >= 2.35) madvises such mappings for transparent huge
pages: ~400 faults of 2 MiB per step, the kernel only zeroes the pages, and memory is still
returned between steps. (Keeping the buffer mapped instead, with mallopt arena/mmap/trim
settings, was as fast but left up to two extra step buffers resident through heap fragmentation:
peak RSS 2.5-3.4 GB vs 1.8 GB.)

glibc reads tunables only at process start, so `ftjax train` (and experiments/sweep.py)
re-executes itself once with `GLIBC_TUNABLES` extended (same interpreter, same argv, same pid).
Other Python drivers of the train loop export `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` themselves;
the loop logs HINT when it runs on CPU without it. `FTJAX_MALLOC_TUNING=0` turns it off. It is a
no-op off Linux, with a glibc older than 2.35 (unknown tunables are ignored) or where the kernel's
transparent huge pages are `never`, and it is not applied where jax has a GPU/TPU plugin (unless
JAX_PLATFORMS=cpu). It changes where host buffers come from, nothing that results depend on.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Optional

ENV = "FTJAX_MALLOC_TUNING"
TUNABLE = "glibc.malloc.hugetlb"
HINT = ("export GLIBC_TUNABLES=glibc.malloc.hugetlb=1 before starting Python (as `ftjax train` "
        "does) for ~10% faster CPU steps; FTJAX_MALLOC_TUNING=0 silences this")


def _accelerator_plugin_installed() -> bool:
  """Whether jax will find a GPU/TPU plugin (checked without importing jax)."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec("libtpu") or importlib.util.find_spec("jax_plugins"):
    return True
  try:
    return bool(importlib.metadata.entry_points(group="jax_plugins"))
  except Exception:  # pylint: disable=broad-except  # a broken dist-info must not stop training
    return False


def tuned_env(environ: Optional[Mapping[str, str]] = None,
              accelerator: Optional[bool] = None) -> Optional[dict]:
  """`environ` with the huge-page tunable added, or None when it is there already / not wanted.

  Only for runs on XLA:CPU: with a GPU/TPU plugin installed (and JAX_PLATFORMS not just `cpu`)
  the step buffers live on the device, and host code that allocates per op got slower with huge
  pages (torch: 3.48 vs 2.95 s per SFT bench step), so the host keeps glibc's defaults.
  """
  environ = os.environ if environ is None else environ
  if not sys.platform.startswith("linux") or environ.get(ENV, "1") == "0":
    return None
  if environ.get("JAX_PLATFORMS", "").strip().lower() != "cpu":
    if _accelerator_plugin_installed() if accelerator is None else accelerator:
      return None
  current = environ.get("GLIBC_TUNABLES", "")
  if any(t.split("=")[0] == TUNABLE for t in current.split(":") if t):
    return None  # already set (by us on the first pass, or by the user: theirs wins)
  env = dict(environ)
  env["GLIBC_TUNABLES"] = ":".join(t for t in (current, f"{TUNABLE}=1") if t)
  return env


def reexec_tuned():
  """Re-executes this process with the tunable set, if it is not; returns when nothing to do."""
  env = tuned_env()
  if env is None or not sys.executable:
    return
  # The interpreter's own options (-m, -c, -X ...) come from orig_argv; argv[0] is the absolute
  # interpreter path, so that the new process finds the same prefix (venv) as this one.
  argv = [sys.executable] + list(getattr(sys, "orig_argv", None) or [""] + sys.argv)[1:]
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, argv, env)
  except OSError:  # e.g. a sandbox that forbids exec: run on untuned
    return
