"""Native CPU attention kernel (ftjax.models.flash_cpu) equals the explicit masked softmax."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.models import attention as attn
from ftjax.models import flash_cpu

needs_kernel = pytest.mark.skipif(not flash_cpu.available(),
                                  reason=f"native kernel: {flash_cpu.unavailable_reason()}")


def test_kernel_builds_where_it_can():
  """A build failure only falls back at run time; here it fails: with a compiler and an AVX2 + FMA
  x86 CPU the shipped source must compile, load and register."""
  flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
  if (flash_cpu._compiler() is None or "avx2" not in flags or "fma" not in flags
      or os.environ.get("FTJAX_NATIVE_ATTENTION") == "0"):
    pytest.skip("no C++ compiler / AVX2 + FMA here")
  assert flash_cpu.available(), flash_cpu.unavailable_reason()


def _inputs(b, t, n, kv, h, seed=0):
  r = np.random.default_rng(seed)
  return tuple(jnp.asarray(r.standard_normal(s), jnp.float32)
               for s in ((b, t, n, h), (b, t, kv, h), (b, t, kv, h), (b, t, n, h)))


def _value_and_grads(fn, q, k, v, do):
  return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * do),
                                    argnums=(0, 1, 2)))(q, k, v)


@needs_kernel
@pytest.mark.parametrize("t,n,kv,h,window,packed,use_window", [
    (96, 4, 2, 16, None, True, None),     # GQA, packed segments and padding
    (100, 4, 4, 32, None, False, None),   # MHA, T not a multiple of the 16-key panels
    (150, 6, 2, 16, 20, True, None),      # sliding window over several query tiles
    (130, 4, 1, 16, 24, False, False),    # MQA; the window switched off per layer
    (200, 8, 2, 64, 40, False, True),     # window on, tiles starting past key 0
    (7, 2, 1, 16, None, False, None),     # shorter than one panel
])
def test_native_matches_explicit(t, n, kv, h, window, packed, use_window):
  b = 2
  q, k, v, do = _inputs(b, t, n, kv, h)
  seg = None
  if packed:
    s = np.ones((b, t), np.int32)
    s[0, t // 3:] = 2
    s[1, :5] = 0  # left padding
    s[1, t // 2:] = 3
    seg = jnp.asarray(s)
  uw = None if use_window is None else jnp.asarray(use_window)
  scale = h ** -0.5
  mask = attn.attention_mask(jnp.ones((b, t), jnp.int32) if seg is None else seg, window, uw)
  ref = _value_and_grads(lambda q, k, v: attn._attend_explicit(q, k, v, mask, scale, None),
                         q, k, v, do)
  got = _value_and_grads(
      lambda q, k, v: flash_cpu.flash_attention_native(q, k, v, seg, scale, window, uw),
      q, k, v, do)
  for a, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(a, r, atol=1e-4 * max(1.0, float(jnp.abs(r).max())), rtol=0)
  out = flash_cpu.flash_attention_native(q, k, v, seg, scale, window, uw)
  np.testing.assert_allclose(out, attn._attend_explicit(q, k, v, mask, scale, None),
                             atol=2e-5, rtol=0)


@needs_kernel
def test_auto_dispatch_picks_native_and_falls_back():
  q, k, v, _ = _inputs(1, 40, 4, 2, 16)
  assert flash_cpu.supports(q, k, v)
  a = attn.attend(q, k, v, None, 0.25, None, None)      # auto on CPU -> native
  b = attn.attend(q, k, v, None, 0.25, None, "flash")
  np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)
  # bfloat16 and head dims not divisible by 16 are not the kernel's: auto falls back to flash,
  # an explicit 'native' says why.
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
  assert not flash_cpu.supports(qb, kb, vb)
  assert attn.attend(qb, kb, vb, None, 0.25, None, None).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match=r"model.attention_impl='native'.*bfloat16"):
    attn.attend(qb, kb, vb, None, 0.25, None, "native")
  q8, k8, v8, _ = _inputs(1, 40, 4, 2, 8)
  assert not flash_cpu.supports(q8, k8, v8)


@needs_kernel
def test_decoder_native_equals_flash_under_vmap_and_remat():
  """The whole model through the kernel: logits and grads equal the XLA flash path; vmap and
  remat (which re-run the forward custom call in the backward pass) keep working."""
  import flax.linen as nn
  from ftjax.models import Decoder, ModelConfig
  base = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
              num_kv_heads=2, remat_policy="dots")
  toks = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 2, 24)), jnp.int32)
  params = nn.unbox(Decoder(ModelConfig(**base)).init(jax.random.key(0), toks[0])["params"])

  def loss_and_grad(impl):
    model = Decoder(ModelConfig(**base, attention_impl=impl))
    f = lambda p, t: jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, t)) ** 2)
    return jax.jit(jax.vmap(jax.value_and_grad(f), in_axes=(None, 0)))(params, toks)

  a, b = loss_and_grad("native"), loss_and_grad("flash")
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)


def test_disabled_by_env_and_multi_device_falls_back():
  """FTJAX_NATIVE_ATTENTION=0 turns the kernel off; on 2 simulated devices `supports` is False
  (GSPMD cannot partition a custom call) and auto attention still runs (XLA flash)."""
  code = (
      "import jax, jax.numpy as jnp\n"
      "from ftjax.models import attention as attn, flash_cpu\n"
      "q = jnp.ones((1, 16, 2, 16)); k = jnp.ones((1, 16, 1, 16))\n"
      "print(flash_cpu.available(), flash_cpu.supports(q, k, k), "
      "attn.attend(q, k, k, None, 0.25, None, None).shape)\n")
  env = dict(os.environ, FTJAX_NATIVE_ATTENTION="0")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout.split()
  assert out[:2] == ["False", "False"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  env.pop("FTJAX_NATIVE_ATTENTION", None)
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout.split()
  assert out[1] == "False" and out[2:] == ["(1,", "16,", "2,", "16)"]
