"""PEFT forwards: LoRA / rsLoRA / DoRA on a Linear (plain or NF4 base kernel) and on the embedding.

Shapes (per layer; nn.scan adds a leading [L] to every param):
  kernel [in, out] | kernel_nf4 uint8 [in/2, out] + absmax leaves (see nf4.py)
  lora_A [in, r] (logical axes (in_axis, 'lora_rank')), lora_B [r, out] (('lora_rank', out_axis)),
  lora_magnitude [out] (DoRA; (out_axis,)).
The embedding table [V, D] is a Linear from one-hot tokens: lora_A [V, r] (PEFT's
lora_embedding_A transposed; zero init), lora_B [r, D] (lora_embedding_B.T; N(0, 1) init),
lora_magnitude [D]; no dropout (PEFT applies none to embeddings). The LM head is a Linear that is
never NF4-quantised (as bitsandbytes QLoRA keeps lm_head in full precision).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.models import layers
from ftjax.peft import nf4
from ftjax.peft.spec import HEAD, hf_name, resolve, scaling

_STATE = threading.local()


@contextlib.contextmanager
def adapters_disabled():
  """Inside this context, traced Linear layers ignore their adapters (base model logits).

  Read at trace time: use it inside the traced function, e.g. a DPO reference forward pass
  `with adapters_disabled(): ref = model.apply({'params': params}, tokens)`; the same params give
  the base model's logits for LoRA, DoRA and QLoRA without a second copy of the weights.
  """
  prev = getattr(_STATE, "disabled", False)
  _STATE.disabled = True
  try:
    yield
  finally:
    _STATE.disabled = prev


def adapters_are_disabled() -> bool:
  return getattr(_STATE, "disabled", False)


def _kaiming_uniform_a_sqrt5(key, shape, dtype):
  """A [in, r]: torch kaiming_uniform_(a=sqrt(5)) on PEFT's [r, in] weight, bound 1/sqrt(in)."""
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def _nf4_base(module, spec, in_f, out_f):
  """Declares the quantised kernel leaves (init = a quantised random init) and the bias."""
  nf4.check_shape(in_f, spec.block_size, f"{hf_name(tuple(module.scope.path), None)} "
                  f"(config.peft.quantize='nf4')")
  in_ax, out_ax = module.axes
  cache = {}

  def q(name):
    def init(key, *_):
      if "q" not in cache:  # one random kernel, quantised once, feeds every NF4 leaf's init
        w = nn.initializers.normal(0.02)(key, (in_f, out_f), jnp.float32)
        cache["q"] = nf4.quantize(w, spec.block_size, spec.double_quant)
      return cache["q"][name]
    return init

  axes = {"kernel_nf4": (in_ax, out_ax), "kernel_absmax": (in_ax, out_ax),
          "kernel_absmax_q": (in_ax, out_ax), "kernel_absmax_scale": (in_ax, None),
          "kernel_absmax_offset": (None, None)}
  names = (["kernel_nf4", "kernel_absmax_q", "kernel_absmax_scale", "kernel_absmax_offset"]
           if spec.double_quant else ["kernel_nf4", "kernel_absmax"])
  leaves = {n: module.param(n, nn.with_logical_partitioning(q(n), axes[n])) for n in names}
  bias = None
  if module.use_bias:
    bias = module.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (out_ax,)),
                        (out_f,), module.cfg.weight_dtype)
  return leaves, bias


@functools.partial(jax.checkpoint, static_argnums=(2, 3))
def _nf4_dot(x, leaves, block, dtype):
  # Rematerialised: the backward pass re-dequantises from the 4-bit leaves instead of keeping a
  # full-precision copy of every layer's kernel as a scan residual.
  return layers.matmul(x, nf4.dequantize(leaves, block, dtype))


def _base(module, spec, in_f, out_f, dtype, tied_kernel=None):
  """(matmul(x) -> x @ W, kernel() -> W, bias) for a plain, an NF4 or a tied base kernel."""
  head = tuple(module.scope.path) == HEAD
  mm = layers.head_matmul if head else layers.matmul
  if tied_kernel is not None:
    tied = tied_kernel.astype(dtype)
    return (lambda v: mm(v, tied)), (lambda: tied), None
  if spec is not None and spec.quantize == "nf4" and not head:
    leaves, bias = _nf4_base(module, spec, in_f, out_f)
    return (lambda v: _nf4_dot(v, leaves, spec.block_size, dtype),
            lambda: nf4.dequantize(leaves, spec.block_size, dtype), bias)
  kernel, bias = module.base_params(in_f)
  kernel = kernel.astype(dtype)
  return (lambda v: mm(v, kernel)), (lambda: kernel), bias


def stack_on_input(in_f: int, out_f: int) -> bool:
  """Which side `lora_matmul`'s forward stacks the adapter on, for a [in_f, out_f] base: the one
  that moves fewer [tokens, dim] activations through memory (a rank-r matmul is memory-bound, so
  each pass over an activation costs about as much as one).

    output side  z = x @ [W | A], y = z[:, :out] + xa @ B: writes xa @ B and re-reads it with z in
                 the add, ~4 passes over [tokens, out];
    input side   xa = x @ A, y = [x | xa] @ [W ; B]: one read of x for xa and one copy of x into
                 the concatenation, ~3 passes over [tokens, in].

  So gate/up_proj and q/o_proj stack on the input, down/k/v_proj on the output. Measured on the
  bench model (2-core CPU, same-process A/B): the LoRA step 6-8% faster than stacking every
  adapter on the output. (A split backward, dy @ W^T + u @ A^T, for in < out measured slower
  than the stacked one and is not used.)
  """
  return 3 * in_f < 4 * out_f


@jax.custom_vjp
def lora_matmul(x, w, a, bs):
  """x @ w + (x @ a) @ bs with the rank-r products stacked next to the base matmul.

  x [..., in], w [in, out] (frozen base), a [in, r], bs [r, out] (B already scaled). Why: the
  plain form spends separate passes over activations on the rank-r products and the adds, each
  costing about one pass of memory traffic; stacking the factors onto the base matmuls (the
  forward's side picked by `stack_on_input`) folds most of them into those. The weight gradient
  of w is written out but is dead code, removed by XLA, whenever w is frozen (LoRA's case).
  """
  return _lora_fwd(x, w, a, bs)[0]


def _lora_fwd(x, w, a, bs):
  in_f, out = w.shape
  x2 = x.reshape(-1, in_f)
  if stack_on_input(in_f, out):
    xa = jnp.dot(x2, a)
    y = jnp.dot(jnp.concatenate([x2, xa], axis=1), jnp.concatenate([w, bs], axis=0))
  else:
    z = jnp.dot(x2, jnp.concatenate([w, a], axis=1))
    xa = z[:, out:]
    y = z[:, :out] + jnp.dot(xa, bs)
  return y.reshape(x.shape[:-1] + (out,)), (x, w, a, bs, xa)


def _lora_bwd(res, dy):
  x, w, a, bs, xa = res
  x2 = x.reshape(-1, x.shape[-1])
  dy2 = dy.reshape(-1, dy.shape[-1])
  u = jnp.dot(dy2, bs.T)  # [tokens, r]: gradient of x @ a
  # One matmul for both input gradients (dy @ W^T + u @ A^T): the [tokens, r] u rides next to dy.
  dx = jnp.dot(jnp.concatenate([dy2, u], axis=1), jnp.concatenate([w, a], axis=1).T)
  return (dx.reshape(x.shape).astype(x.dtype), jnp.dot(x2.T, dy2).astype(w.dtype),
          layers.skinny_weight_grad(x2, u).astype(a.dtype), jnp.dot(xa.T, dy2).astype(bs.dtype))


lora_matmul.defvjp(_lora_fwd, _lora_bwd)


@jax.custom_vjp
def rank_down(x, a):
  """x @ a for the down factor a [in, r] of the unfused paths (dropout, QLoRA): its weight
  gradient goes through `layers.skinny_weight_grad` (3-4x faster on CPU than autodiff's form)."""
  return layers.matmul(x, a)


def _rank_down_fwd(x, a):
  return layers.matmul(x, a), (x, a)


def _rank_down_bwd(res, g):
  x, a = res
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  return (layers.matmul(g, a.T).astype(x.dtype),
          layers.skinny_weight_grad(x2, g2).astype(a.dtype))


rank_down.defvjp(_rank_down_fwd, _rank_down_bwd)


def _dropout(module, x, rate):
  if rate <= 0.0 or not module.has_rng("dropout"):
    return x
  keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _declare_adapter(module, spec, rank, kernel, in_f, out_f):
  in_ax, out_ax = module.axes
  wdt = module.cfg.weight_dtype
  a = module.param("lora_A", nn.with_logical_partitioning(_kaiming_uniform_a_sqrt5,
                                                          (in_ax, "lora_rank")),
      (in_f, rank), wdt)
  b = module.param("lora_B", nn.with_logical_partitioning(nn.initializers.zeros,
                                                          ("lora_rank", out_ax)),
                   (rank, out_f), wdt)
  m = None
  if spec.use_dora:  # ||W|| over the input dim per output (B = 0 at init, so W + s*AB = W)
    m = module.param("lora_magnitude", nn.with_logical_partitioning(
        lambda *_: jnp.linalg.norm(kernel().astype(jnp.float32), axis=0).astype(wdt), (out_ax,)))
  return a, b, m


def _check_rank(rank, n_in, n_out, path):
  if rank > min(n_in, n_out):
    raise ValueError(f"config.peft.r / rank_pattern: rank {rank} > min(in, out) = "
                     f"{min(n_in, n_out)} for {hf_name(path, None)} [{n_in}, {n_out}]")


def adapt_linear(module, x: jax.Array, in_f: int, out_f: int, dtype,
                 tied_kernel=None) -> jax.Array:
  """y = x @ W (+ b), plus the adapter's contribution when this module is targeted."""
  spec = getattr(module.cfg, "peft", None)
  matmul, kernel, bias = _base(module, spec, in_f, out_f, dtype, tied_kernel)
  add_bias = lambda y: y if bias is None else y + bias.astype(dtype)
  x = x.astype(dtype)
  path = tuple(module.scope.path)
  target = None if spec is None else resolve(spec, path, module.cfg.num_layers)
  if target is None:
    return add_bias(matmul(x))
  rank, alpha = target
  _check_rank(rank, in_f, out_f, path)
  a, b, m = _declare_adapter(module, spec, rank, kernel, in_f, out_f)
  if adapters_are_disabled():
    return add_bias(matmul(x))
  s = scaling(spec, rank, alpha)
  xd = _dropout(module, x, spec.dropout)
  plain = tied_kernel is None and spec.quantize is None
  if xd is x and plain:  # the common case: one fused matmul each way
    y = lora_matmul(x, kernel(), a.astype(dtype), (b * s).astype(dtype))
    if m is not None:  # DoRA: m / ||W + s*A@B|| rescales base + LoRA together (as `_dora`)
      y = _magnitude_scale(kernel(), a, b, m, s, dtype) * y
    return add_bias(y)
  # Scale the [r, out] factor, not the [tokens, out] product: one less pass over activations.
  lora = layers.matmul(rank_down(xd, a.astype(dtype)), (b * s).astype(dtype))
  base = matmul(x)
  if m is None:
    return add_bias(base + lora)
  return add_bias(_dora(x, xd, matmul, kernel, base, lora, a, b, m, s, dtype))


def _magnitude_scale(w, a, b, m, s, dtype):
  """DoRA's m / ||W + s*A@B|| per output column (float32 norm, detached as in PEFT)."""
  w = w.astype(jnp.float32) + s * jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32))
  norm = jax.lax.stop_gradient(jnp.linalg.norm(w, axis=0))
  return (m.astype(jnp.float32) / norm).astype(dtype)


def _dora(x, xd, matmul, kernel, base, lora, a, b, m, s, dtype):
  """PEFT's DoRA: m / ||W + s*A@B||_in (norm detached) rescales base and LoRA outputs."""
  mag_scale = _magnitude_scale(kernel(), a, b, m, s, dtype)
  if xd is x:
    return mag_scale * (base + lora)
  # With dropout PEFT rescales the base path of the dropped-out input (dora.py: base_result=None).
  return base + (mag_scale - 1) * matmul(xd) + mag_scale * lora


def declare_embed_adapter(module):
  """(lora_A [V, r], lora_B [r, D], lora_magnitude [D] or None) of a targeted embedding, else None.

  Called from `ftjax.models.layers.Embed.setup`. PEFT's init: A = 0, B ~ N(0, 1), so step 0
  equals the base; DoRA's magnitude = ||E||_V per feature (PEFT's norm over num_embeddings).
  """
  spec = getattr(module.cfg, "peft", None)
  path = tuple(module.scope.path)
  target = None if spec is None else resolve(spec, path, module.cfg.num_layers)
  if target is None:
    return None
  rank = target[0]
  n_v, n_d = module.num_embeddings, module.features
  _check_rank(rank, n_v, n_d, path)
  wdt = module.param_dtype
  a = module.param("lora_A", nn.with_logical_partitioning(nn.initializers.zeros,
                                                          ("vocab", "lora_rank")), (n_v, rank), wdt)
  b = module.param("lora_B", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                          ("lora_rank", "embed")), (rank, n_d), wdt)
  m = None
  if spec.use_dora:
    m = module.param("lora_magnitude", nn.with_logical_partitioning(
        lambda *_: jnp.linalg.norm(module.embedding.astype(jnp.float32), axis=0).astype(wdt),
        ("embed",)))
  return a, b, m


def adapt_embed(module, tokens: jax.Array, base: jax.Array) -> jax.Array:
  """base [..., D] = E[tokens], plus s * A[tokens] @ B (DoRA: rescaled per feature)."""
  if module.adapter is None or adapters_are_disabled():
    return base
  a, b, m = module.adapter
  spec = module.cfg.peft
  rank, alpha = resolve(spec, tuple(module.scope.path), module.cfg.num_layers)
  s = scaling(spec, rank, alpha)
  dtype = base.dtype
  lora = layers.matmul(jnp.take(a.astype(dtype), tokens, axis=0), (b * s).astype(dtype))
  if m is None:
    return base + lora
  return _magnitude_scale(module.embedding, a, b, m, s, dtype) * (base + lora)
