"""Native CPU attention: csrc/flash_cpu.cc through the XLA FFI (the CPU default when it builds).

The kernel is compiled on first use with the system C++ compiler (g++ or clang++, AVX2 + FMA)
into a cache directory keyed by the source, jaxlib version and flags, then registered with XLA as
ftjax_flash_fwd / ftjax_flash_bwd. Nothing is downloaded or shipped prebuilt. When the compiler,
the CPU features or the shapes don't allow it, `available()` / `supports()` say so and callers
use the blockwise XLA path (`ftjax.models.flash`), which computes the same function.

  FTJAX_NATIVE_ATTENTION=0   never use the kernel (pure XLA everywhere)
  FTJAX_CACHE_DIR            where the built library goes (default ~/.cache/ftjax, else
                             $TMPDIR/ftjax-cache)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

_SRC = os.path.join(os.path.dirname(__file__), "csrc", "flash_cpu.cc")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-Wno-attributes",
          "-Wno-return-type"]
_lock = threading.Lock()
_state: dict = {}


def _compiler() -> Optional[str]:
  for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _build() -> str:
  """Compiles the kernel once per (source, jaxlib, compiler) into the cache; returns its path."""
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler (g++ / clang++) on PATH")
  with open(_SRC, "rb") as f:
    src = f.read()
  key = hashlib.sha256(src + jax.lib.__version__.encode() + cxx.encode()
                       + " ".join(_FLAGS).encode()).hexdigest()[:16]
  cache = os.environ.get("FTJAX_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "ftjax")
  try:
    os.makedirs(cache, exist_ok=True)
  except OSError:  # read-only home: build next to other temporary files
    cache = os.path.join(tempfile.gettempdir(), "ftjax-cache")
    os.makedirs(cache, exist_ok=True)
  path = os.path.join(cache, f"flash_cpu-{key}.so")
  if os.path.exists(path):
    return path
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)  # concurrent builders race on rename only
  os.close(fd)
  cmd = [cxx, *_FLAGS, "-I", jax.ffi.include_dir(), _SRC, "-o", tmp]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    os.unlink(tmp)
    raise RuntimeError(f"building {_SRC} failed:\n{proc.stderr[-2000:]}")
  os.replace(tmp, path)
  return path


def available() -> bool:
  """True when the kernel is built, loadable, supported by this CPU and registered with XLA."""
  if os.environ.get("FTJAX_NATIVE_ATTENTION", "1") == "0":
    return False
  with _lock:
    if "ok" not in _state:
      try:
        lib = ctypes.CDLL(_build())
        if not lib.ftjax_flash_cpu_supported():
          raise RuntimeError("CPU lacks AVX2/FMA")
        jax.ffi.register_ffi_target("ftjax_flash_fwd", jax.ffi.pycapsule(lib.FtjaxFlashFwd),
                                    platform="cpu")
        jax.ffi.register_ffi_target("ftjax_flash_bwd", jax.ffi.pycapsule(lib.FtjaxFlashBwd),
                                    platform="cpu")
        _state.update(ok=True, lib=lib)
      except (OSError, RuntimeError, AttributeError) as e:  # any failure -> XLA path
        _state.update(ok=False, error=str(e))
    return _state["ok"]


def unavailable_reason() -> Optional[str]:
  return None if available() else _state.get("error", "disabled by FTJAX_NATIVE_ATTENTION=0")


def supports(q, k, v) -> bool:
  """Whether the kernel takes these inputs here: float32 on a single CPU device, H % 16 == 0.

  Multi-device programs keep the XLA path: GSPMD cannot partition a custom call, so it would
  gather every shard onto each device.
  """
  return (jax.default_backend() == "cpu" and jax.device_count() == 1
          and all(x.dtype == jnp.float32 for x in (q, k, v))
          and q.shape[-1] % 16 == 0 and q.shape[2] % k.shape[2] == 0
          and k.shape[1] == q.shape[1] and available())


def _tile(g: int) -> int:
  return max(1, 64 // g)  # ~64 score rows per tile: [rows, keys] f32 stays in L2


def _extras(segment_ids, use_window, b):
  seg = (jnp.zeros((1,), jnp.int32) if segment_ids is None
         else jnp.asarray(segment_ids, jnp.int32).reshape(b, -1))
  flag = (jnp.ones((1,), jnp.int32) if use_window is None
          else jnp.asarray(use_window, jnp.int32).reshape(1))
  return seg, flag


def _attrs(scale, window, has_seg, g):
  return dict(scale=np.float32(scale), window=np.int64(window), has_seg=np.int64(has_seg),
              tq=np.int64(_tile(g)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _native(q, k, v, seg, flag, scale, window, has_seg):
  return _native_fwd(q, k, v, seg, flag, scale, window, has_seg)[0]


def _native_fwd(q, k, v, seg, flag, scale, window, has_seg):
  b, t, n, _ = q.shape
  g = n // k.shape[2]
  o, lse = jax.ffi.ffi_call(
      "ftjax_flash_fwd",
      (jax.ShapeDtypeStruct(q.shape, q.dtype),
       jax.ShapeDtypeStruct((b, k.shape[2], t * g), jnp.float32)),
      vmap_method="sequential",
  )(q, k, v, seg, flag, **_attrs(scale, window, has_seg, g))
  return o, (q, k, v, seg, flag, o, lse)


def _native_bwd(scale, window, has_seg, res, do):
  q, k, v, seg, flag, o, lse = res
  g = q.shape[2] // k.shape[2]
  dq, dk, dv = jax.ffi.ffi_call(
      "ftjax_flash_bwd",
      (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
       jax.ShapeDtypeStruct(v.shape, v.dtype)),
      vmap_method="sequential",
  )(q, k, v, seg, flag, o, lse, do.astype(q.dtype),
    **_attrs(scale, window, has_seg, g))
  zero = lambda x: np.zeros(x.shape, jax.dtypes.float0)  # int inputs take float0 cotangents
  return dq, dk, dv, zero(seg), zero(flag)


_native.defvjp(_native_fwd, _native_bwd)


def flash_attention_native(q, k, v, segment_ids, scale: float, window: Optional[int] = None,
                           use_window=None):
  """Same contract as `flash.flash_attention` (q [B,T,N,H], k/v [B,T,K,H]); `supports` says when."""
  if not available():  # also what registers the FFI targets
    raise RuntimeError(f"native CPU attention unavailable: {unavailable_reason()}")
  seg, flag = _extras(segment_ids, use_window, q.shape[0])
  return _native(q, k, v, seg, flag, float(scale), int(window or 0), segment_ids is not None)
