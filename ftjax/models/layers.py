"""Building blocks shared by every decoder family: linear, norms, rotary embeddings, MLP.

Every parameter carries logical axis names (see `ftjax/sharding.py`); the config maps them to mesh
axes. Parameter names follow Hugging Face module names so LoRA target patterns and HF conversion
read the same as in transformers/PEFT.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.models.config import ModelConfig

# HF's `initializer_range` default; random init only matters for from-scratch runs.
_INIT = nn.initializers.normal(stddev=0.02)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., in] @ w [in, out] with the leading dims flattened to one.

  Why: with a 3-D activation, XLA:CPU lays the weight-gradient contraction out as a transposing
  elementwise fusion that runs ~2x slower than the matmuls themselves; on [B*T, in] it does not
  (the SwiGLU MLP forward+backward runs ~1.8x faster on CPU; a no-op on GPU/TPU).
  """
  y = jnp.dot(x.reshape(-1, x.shape[-1]), w)
  return y.reshape(x.shape[:-1] + (w.shape[-1],))


@jax.custom_vjp
def head_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """`matmul` for the LM head (w [hidden, vocab]), whose weight gradient on CPU contracts a
  materialised x^T [hidden, tokens] instead of x's token axis in place.

  Why: XLA:CPU hands a dot whose lhs contracts its leading axis (x^T @ dy) to Eigen, which runs the
  [hidden, vocab] head gradient at about half the matmul peak (bench model: 207 vs 106 ms with the
  x^T copy, 4 MB); the layers' narrower weight gradients run about as fast either way, so only the
  head takes this path. The copy sits behind an optimization barrier so XLA cannot fold the
  transpose back into the dot; other platforms contract in place.
  """
  return matmul(x, w)


def _head_fwd(x, w):
  return matmul(x, w), (x, w)


def _head_bwd(res, dy):
  x, w = res
  x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  dx = jnp.dot(dy2, w.T).reshape(x.shape).astype(x.dtype)
  dw = jax.lax.platform_dependent(
      x2, dy2, cpu=lambda a, g: jnp.dot(jax.lax.optimization_barrier(a.T.copy()), g),
      default=lambda a, g: jnp.dot(a.T, g))
  return dx, dw.astype(w.dtype)


head_matmul.defvjp(_head_fwd, _head_bwd)


def skinny_weight_grad(x2: jax.Array, g: jax.Array) -> jax.Array:
  """x2^T @ g for x2 [tokens, in] and a narrow g [tokens, r] (a rank-r factor's gradient).

  On CPU it is computed as (g^T @ x2)^T, behind an optimization barrier so XLA cannot fold it
  back: XLA:CPU sends x2^T @ g (contracting both leading axes into a [in, r] result) to Eigen at
  ~20-35 GFLOP/s, while g^T @ x2 ([r, in], the wide axis minor) runs at 55-135 (bench shapes:
  1.7 -> 0.6 ms at in=512, 2.5 -> 0.7 ms at in=1408). Other platforms contract directly.
  """
  return jax.lax.platform_dependent(
      x2, g, cpu=lambda a, b: jax.lax.optimization_barrier(jnp.dot(b.T, a)).T,
      default=lambda a, b: jnp.dot(a.T, b))


def constrain(x, axes: Tuple[Optional[str], ...]):
  """Logical sharding constraint on an activation (no-op outside a mesh/rules context)."""
  return nn.with_logical_constraint(x, axes)


class Linear(nn.Module):
  """y = x @ kernel (+ bias). kernel is [in, out] (HF stores [out, in]; conversion transposes).

  This is the single place where a weight meets an activation, so PEFT (LoRA/DoRA/NF4) hooks in
  here via `ftjax.peft.adapt_linear`.
  """
  features: int
  axes: Tuple[str, str]
  cfg: ModelConfig
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, tied_kernel: Optional[jax.Array] = None) -> jax.Array:
    """tied_kernel [in, out]: a weight owned elsewhere (the tied LM head reads the embedding
    table); only adapter params, if any, are declared here then."""
    from ftjax import peft  # local import: peft depends on this module
    dtype = self.cfg.compute_dtype
    in_features = x.shape[-1]
    return peft.adapt_linear(self, x, in_features, self.features, dtype, tied_kernel)

  def base_params(self, in_features: int):
    """Declares (or reads) the plain kernel and bias; used by the PEFT hook when not quantised."""
    kernel = self.param("kernel", nn.with_logical_partitioning(_INIT, self.axes),
                        (in_features, self.features), self.cfg.weight_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                        (self.features,), self.cfg.weight_dtype)
    return kernel, bias


class Embed(nn.Embed):
  """Token embedding table [V, D] (HF embed_tokens) that PEFT can adapt like a Linear from one-hot
  tokens: LoRA/DoRA leaves are declared and applied via `ftjax.peft` (declare_embed_adapter,
  adapt_embed). `attend` (the tied LM head) reads the base table only, as a tied HF lm_head does
  under PEFT.
  """
  cfg: Optional[ModelConfig] = None

  def setup(self):
    from ftjax import peft  # local import: peft depends on this module
    super().setup()
    self.adapter = peft.declare_embed_adapter(self)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    from ftjax import peft  # local import: peft depends on this module
    return peft.adapt_embed(self, inputs, super().__call__(inputs))

  def table(self) -> jax.Array:
    """The base embedding [V, D] (param dtype)."""
    return self.embedding

  def attend(self, query: jax.Array) -> jax.Array:
    """The tied LM head: query [..., D] @ E^T (nn.Embed.attend through `head_matmul`)."""
    query, embedding = nn.dtypes.promote_dtype(query, self.embedding, dtype=self.dtype)
    return head_matmul(query, embedding.T)


class Norm(nn.Module):
  """RMSNorm (Llama; Gemma's (1 + w) variant) or LayerNorm (GPT-2), always computed in float32."""
  cfg: ModelConfig
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    d = x.shape[-1]
    init = nn.initializers.zeros if cfg.norm_plus_one else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(init, (self.axis_name,)), (d,),
                       cfg.weight_dtype)
    xf = x.astype(jnp.float32)
    if cfg.norm_type == "layernorm":
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             (self.axis_name,)),
                        (d,), cfg.weight_dtype)
      mean = xf.mean(-1, keepdims=True)
      var = jnp.square(xf - mean).mean(-1, keepdims=True)
      y = (xf - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
      return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + cfg.norm_eps)
    if cfg.norm_plus_one:  # Gemma multiplies in float32 by (1 + w) before casting back
      return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
    # Llama casts the normalised activation back first, then multiplies by w.
    return scale.astype(x.dtype) * y.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig, seq_len=None) -> Tuple[jax.Array, float]:
  """Inverse frequencies [head_dim/2] (float32) and the attention scaling factor for cos/sin."""
  dim = cfg.dim_per_head
  base = cfg.rope_theta
  inv = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  scaling = dict(cfg.rope_scaling or ())
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return inv, 1.0
  factor = float(scaling.get("factor", 1.0))
  if kind == "linear":
    return inv / factor, 1.0
  if kind == "dynamic":
    # NTK-aware: grow the base once the sequence exceeds the original context (as HF does).
    orig = scaling.get("original_max_position_embeddings", cfg.max_position_embeddings)
    seq = jnp.maximum(seq_len, orig).astype(jnp.float32)
    new_base = base * ((factor * seq / orig) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (new_base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)), 1.0
  if kind == "llama3":
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    orig = float(scaling.get("original_max_position_embeddings", 8192))
    low_wl, high_wl = orig / low, orig / high
    wavelen = 2 * math.pi / inv
    inv_l = jnp.where(wavelen > low_wl, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return jnp.where(medium, smoothed, inv_l), 1.0
  raise ValueError(f"model.rope_scaling: unsupported rope_type {kind!r} "
                   "(supported: default, linear, dynamic, llama3)")


def rope_tables(positions: jax.Array, cfg: ModelConfig, dtype) -> Tuple[jax.Array, jax.Array]:
  """cos, sin [B, T, 1, 1, H/2] for `apply_rope`, from positions [B, T] int.

  Computed once per forward pass; the Decoder hands them to every layer (cos/sin of the same
  positions are the same for all layers).
  """
  inv, attn_factor = rope_inv_freq(cfg, positions.max() + 1)
  freqs = positions.astype(jnp.float32)[..., None] * inv  # [B, T, H/2]
  # HF computes cos/sin in float32 and casts them to the activation dtype before rotating.
  cos_sin = jnp.concatenate([jnp.cos(freqs), jnp.sin(freqs)], -1) * attn_factor
  # Multiplying by the identity is exact, and a matmul's output is a buffer that XLA cannot fuse
  # into its consumers: without it XLA:CPU recomputes cos/sin inside every fusion that reads the
  # rotated q/k (each attention block's slice of q, forward and backward), ~4% of an SFT step.
  # (lax.optimization_barrier does not stop that: it blocks CSE and simplification, as in
  # `_swiglu_bwd`, but XLA:CPU removes barriers before fusing.)
  eye = jnp.eye(cos_sin.shape[-1], dtype=jnp.float32)
  cos_sin = jnp.dot(cos_sin, eye, precision=jax.lax.Precision.HIGHEST).astype(dtype)
  cos, sin = jnp.split(cos_sin[:, :, None, None, :], 2, axis=-1)
  return cos, sin


def apply_rope(x: jax.Array, rope: Tuple[jax.Array, jax.Array]) -> jax.Array:
  """Rotary embedding, HF 'rotate_half' layout. x: [B, T, N, H]; rope = rope_tables(..., x.dtype).

  Written on the halves [..., 2, H/2] with a flip instead of slicing and concatenating: the same
  products and sums as HF's x * cos + rotate_half(x) * sin (bit for bit), but one fused pass on
  XLA:CPU instead of a concatenate fusion (~3% of an SFT step on the bench model).
  """
  cos, sin = rope
  halves = x.reshape(x.shape[:-1] + (2, x.shape[-1] // 2))  # [..., (x1, x2), H/2]
  sign = jnp.asarray([-1.0, 1.0], x.dtype)[:, None]  # rotate_half = (-x2, x1)
  return (halves * cos + jnp.flip(halves, axis=-2) * (sign * sin)).reshape(x.shape)


def activation(name: str):
  if name == "silu":
    return jax.nn.silu
  if name in ("gelu_tanh", "gelu_new", "gelu_pytorch_tanh"):
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name == "relu":
    return jax.nn.relu
  raise ValueError(f"model.mlp_activation: unknown activation {name!r}")


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up, with a backward pass that keeps only gate and up.

  Why: autodiff of silu(g) * u saves sigmoid(g) and silu(g) as extra [tokens, mlp] residuals and
  spends three elementwise passes in each direction; this is one fused pass forward and one per
  gradient (each recomputes the sigmoid). Same forward formula as jax.nn.silu.
  """
  return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
  return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, dy):
  gate, up = res
  # Two barrier copies of gate (no data moves) so each gradient recomputes its own sigmoid.
  # Without them XLA:CPU shares one sigmoid between the forward and both gradients and writes it
  # out as an extra [tokens, mlp] array read three times: 4 elementwise passes instead of 3,
  # ~1-3% of an SFT step. On GPU/TPU the barrier only blocks that CSE.
  g_dgate, g_dup = jax.lax.optimization_barrier((gate, gate))
  sig = jax.nn.sigmoid(g_dgate)
  dgate = dy * up * (sig * (1 + g_dgate * (1 - sig)))
  dup = dy * (g_dup * jax.nn.sigmoid(g_dup))
  return dgate.astype(gate.dtype), dup.astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nn.Module):
  """Gated (SwiGLU / GeGLU: gate_proj, up_proj, down_proj) or plain (GPT-2: up_proj, down_proj)."""
  cfg: ModelConfig
  intermediate_size: Optional[int] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    f = self.intermediate_size or cfg.intermediate_size
    act = activation(cfg.mlp_activation)
    up = Linear(f, ("embed", "mlp"), cfg, cfg.mlp_bias, name="up_proj")(x)
    if cfg.mlp_gated:
      gate = Linear(f, ("embed", "mlp"), cfg, cfg.mlp_bias, name="gate_proj")(x)
      h = swiglu(gate, up) if cfg.mlp_activation == "silu" else act(gate) * up
    else:
      h = act(up)
    h = constrain(h, ("batch", "length", "act_mlp"))
    return Linear(x.shape[-1], ("mlp", "embed"), cfg, cfg.mlp_bias, name="down_proj")(h)
