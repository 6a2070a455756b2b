"""Routed mixture-of-experts feed-forward block (Mixtral, Qwen2/3-MoE, DeepSeek-style routers).

Parameters (inside the scanned decoder each gets a leading [L] 'layers' axis):
  gate/kernel                      [D, E]     router, applied in float32
  gate/e_score_correction_bias     [E]        sigmoid_bias router only (selection bias)
  experts/{gate_proj,up_proj}/kernel  [E, D, F]  logical ('expert', 'embed', 'mlp')
  experts/down_proj/kernel            [E, F, D]  logical ('expert', 'mlp', 'embed')
  (+ experts/*/lora_A [E, in, r], lora_B [E, r, out] when LoRA targets them)
  shared_expert/{gate,up,down}_proj, shared_expert_gate/kernel [D, 1]   (Qwen2-MoE, optional)

Two dispatch paths with identical outputs when no token is dropped:
  dropless: assignments sorted by expert, grouped matmul (`jax.lax.ragged_dot`);
  capacity: fixed [E, C, D] buffers, C = ceil(capacity_factor * N * k / E); overflow dropped.

Router statistics are sown into the 'aux' collection (one value per layer after the scan) and
turned into losses/metrics by `collect_aux`; see `ftjax/objectives/moe_aux.py` for the objective
side. Padding tokens (segment_ids == 0) are excluded from the statistics and, on the capacity
path, never take a buffer slot.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.models.config import ModelConfig
from ftjax.models.layers import MLP, Linear, activation, constrain

_INIT = nn.initializers.normal(stddev=0.02)
ROUTERS = ("softmax_topk", "topk_softmax", "sigmoid_bias")
DISPATCHES = ("dropless", "capacity")
AUX_NAMES = ("router_counts", "router_prob_sum", "router_tokens", "router_z_sum", "dropped")


def validate_config(cfg: ModelConfig):
  """One clear ValueError per bad MoE setting (called at trace time and by importers)."""
  if cfg.num_experts <= 0:
    return
  if not 1 <= cfg.num_experts_per_tok <= cfg.num_experts:
    raise ValueError(f"model.num_experts_per_tok={cfg.num_experts_per_tok} must be in "
                     f"[1, model.num_experts={cfg.num_experts}]")
  if cfg.moe_router not in ROUTERS:
    raise ValueError(f"model.moe_router={cfg.moe_router!r}: expected one of {ROUTERS}")
  if cfg.moe_dispatch not in DISPATCHES:
    raise ValueError(f"model.moe_dispatch={cfg.moe_dispatch!r}: expected one of {DISPATCHES}")
  if not cfg.moe_capacity_factor > 0:
    raise ValueError(f"model.moe_capacity_factor={cfg.moe_capacity_factor} must be > 0")


def _current_mesh_shape() -> Dict[str, int]:
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.shape:
    return dict(mesh.shape)
  try:  # `with mesh:` (what the train loop uses) only sets the legacy thread resources
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)
      from jax.interpreters import pxla  # pylint: disable=g-import-not-at-top
      return dict(pxla.thread_resources.env.physical_mesh.shape)
  except Exception:  # pylint: disable=broad-except
    return {}


def check_expert_sharding(num_experts: int, mesh_shape: Optional[Dict[str, int]] = None):
  """Raises if the mesh axes the 'expert' logical axis maps to do not divide num_experts."""
  mesh_shape = _current_mesh_shape() if mesh_shape is None else mesh_shape
  if not mesh_shape:
    return
  spec = nn.logical_to_mesh_axes(("expert",))[0]
  if spec is None:
    return
  axes = (spec,) if isinstance(spec, str) else tuple(spec)
  shards = math.prod(mesh_shape.get(a, 1) for a in axes)
  if num_experts % shards:
    raise ValueError(f"model.num_experts={num_experts} is not divisible by the expert mesh axes "
                     f"{axes} of total size {shards} (config.mesh / config.sharding.rules)")


# ----------------------------------------------------------------------------- routing


def route(logits: jax.Array, cfg: ModelConfig, bias: Optional[jax.Array] = None):
  """Router logits [N, E] (float32) -> (weights [N, k] f32, experts [N, k] int32, probs [N, E]).

  `probs` is the distribution the load-balancing loss uses: softmax(logits) for the softmax
  routers (as transformers' load_balancing_loss_func), normalised sigmoid scores otherwise.
  """
  k = cfg.num_experts_per_tok
  logits = logits.astype(jnp.float32)
  if cfg.moe_router == "softmax_topk":  # Mixtral (always renormalised), Qwen (norm_topk_prob)
    probs = jax.nn.softmax(logits, axis=-1)
    w, idx = jax.lax.top_k(probs, k)
    if cfg.moe_norm_topk_prob:
      w = w / w.sum(-1, keepdims=True)
  elif cfg.moe_router == "topk_softmax":
    probs = jax.nn.softmax(logits, axis=-1)
    vals, idx = jax.lax.top_k(logits, k)
    w = jax.nn.softmax(vals, axis=-1)
  else:  # sigmoid_bias: DeepSeek-V3; the bias steers selection only, never the weights
    scores = jax.nn.sigmoid(logits)
    sel = scores if bias is None else scores + jax.lax.stop_gradient(bias.astype(jnp.float32))
    _, idx = jax.lax.top_k(sel, k)
    w = jnp.take_along_axis(scores, idx, axis=-1)
    if cfg.moe_norm_topk_prob:
      w = w / (w.sum(-1, keepdims=True) + 1e-20)
    probs = scores / scores.sum(-1, keepdims=True)
  return w, idx.astype(jnp.int32), probs


# ----------------------------------------------------------------------------- dispatch


def _expert_ffn(x, wg, wu, wd, act, matmul):
  return matmul(act(matmul(x, wg)) * matmul(x, wu), wd)


def dispatch_dropless(x, idx, w, wg, wu, wd, act):
  """x [N, D], idx/w [N, k], w{g,u} [E, D, F], wd [E, F, D] -> y [N, D] float32, dropped=0."""
  n, d = x.shape
  k, e = idx.shape[1], wg.shape[0]
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)  # assignment slots grouped by expert
  xs = x[order // k]
  sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
  ys = _expert_ffn(xs, wg, wu, wd, act, lambda a, b: jax.lax.ragged_dot(a, b, sizes))
  y = ys[jnp.argsort(order)].reshape(n, k, d)
  return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), w), jnp.zeros((), jnp.float32)


def capacity(num_tokens: int, cfg: ModelConfig) -> int:
  k, e = cfg.num_experts_per_tok, cfg.num_experts
  return max(1, math.ceil(cfg.moe_capacity_factor * num_tokens * k / e))


def dispatch_capacity(x, idx, w, wg, wu, wd, act, valid, cap: int):
  """As `dispatch_dropless` with [E, C, D] buffers; returns (y [N, D] f32, dropped count).

  Priority is slot-major (GShard): every token's first choice is placed before any second
  choice, then in token order; assignments past an expert's capacity contribute zero.
  """
  n, d = x.shape
  k, e = idx.shape[1], wg.shape[0]
  onehot = jax.nn.one_hot(idx.T, e, dtype=jnp.int32) * valid[None, :, None]  # [k, N, E]
  pos = jnp.cumsum(onehot.reshape(k * n, e), axis=0).reshape(k, n, e) - 1
  pos = (pos * onehot).sum(-1).T  # [N, k] slot of each assignment in its expert's buffer
  ok = valid[:, None] > 0
  keep = (pos < cap) & ok
  e_idx = jnp.where(keep, idx, e)  # out-of-range rows are dropped by the scatter below
  src = jnp.broadcast_to(x[:, None, :], (n, k, d))
  buf = jnp.zeros((e, cap, d), x.dtype).at[e_idx, pos].set(src, mode="drop")
  buf = constrain(buf, ("expert", None, "act_embed"))
  out = _expert_ffn(buf, wg, wu, wd, act, lambda a, b: jnp.einsum("ecd,edf->ecf", a, b))
  out = constrain(out, ("expert", None, "act_embed"))
  y = out.at[e_idx, pos].get(mode="fill", fill_value=0)  # [N, k, D]
  y = jnp.where(keep[..., None], y.astype(jnp.float32), 0.0)
  dropped = ((~keep) & ok).sum().astype(jnp.float32)
  return jnp.einsum("nkd,nk->nd", y, w), dropped


# ----------------------------------------------------------------------------- layer


class ExpertWeight(nn.Module):
  """One stacked expert projection: kernel [E, in, out] (+ per-expert LoRA when targeted).

  Laid out like a Linear (a dict holding 'kernel', plus lora_A [E, in, r] / lora_B [E, r, out])
  so ftjax.peft's targeting (`target_modules` matches model.layers.N.mlp.experts.gate_proj),
  trainable mask and merge treat it as one; the adapter is folded into the weight,
  W_e + s * A_e @ B_e, which both dispatch paths then use unchanged.
  """
  cfg: ModelConfig
  shape: Tuple[int, int, int]
  axes: Tuple[str, str, str]

  @nn.compact
  def __call__(self) -> jax.Array:
    cfg = self.cfg
    w = self.param("kernel", nn.with_logical_partitioning(_INIT, self.axes), self.shape,
                   cfg.weight_dtype)
    spec = getattr(cfg, "peft", None)
    target = None
    if spec is not None:
      from ftjax.peft import lora, spec as spec_lib  # pylint: disable=g-import-not-at-top
      target = spec_lib.resolve(spec, tuple(self.scope.path), cfg.num_layers)
    if target is None:
      return w.astype(cfg.compute_dtype)
    if spec.use_dora or spec.quantize:
      raise ValueError("config.peft: DoRA / NF4 are not supported on MoE expert weights; "
                       "exclude 'experts' from target_modules")
    rank, alpha = target
    e, n_in, n_out = self.shape
    bound = 1.0 / math.sqrt(n_in)  # PEFT's kaiming_uniform(a=sqrt(5)) per expert
    a = self.param("lora_A", nn.with_logical_partitioning(
        lambda k, s, d: jax.random.uniform(k, s, jnp.float32, -bound, bound).astype(d),
        (self.axes[0], self.axes[1], "lora_rank")), (e, n_in, rank), cfg.weight_dtype)
    b = self.param("lora_B", nn.with_logical_partitioning(
        nn.initializers.zeros, (self.axes[0], "lora_rank", self.axes[2])), (e, rank, n_out),
                   cfg.weight_dtype)
    if lora.adapters_are_disabled():
      return w.astype(cfg.compute_dtype)
    delta = jnp.einsum("eir,ero->eio", a.astype(jnp.float32), b.astype(jnp.float32))
    s = spec_lib.scaling(spec, rank, alpha)
    return (w.astype(jnp.float32) + s * delta).astype(cfg.compute_dtype)


class Experts(nn.Module):
  """E stacked SwiGLU experts; returns the three weights [E, D, F], [E, D, F], [E, F, D]."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, d: int):
    cfg = self.cfg
    e, f = cfg.num_experts, cfg.moe_intermediate_size or cfg.intermediate_size
    wg = ExpertWeight(cfg, (e, d, f), ("expert", "embed", "mlp"), name="gate_proj")()
    wu = ExpertWeight(cfg, (e, d, f), ("expert", "embed", "mlp"), name="up_proj")()
    wd = ExpertWeight(cfg, (e, f, d), ("expert", "mlp", "embed"), name="down_proj")()
    return wg, wu, wd


class MoEBlock(nn.Module):
  """x [B, T, D], segment_ids [B, T] (0 = padding) -> [B, T, D] in x.dtype."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, segment_ids: Optional[jax.Array] = None) -> jax.Array:
    cfg = self.cfg
    validate_config(cfg)
    check_expert_sharding(cfg.num_experts)
    b, t, d = x.shape
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    flat = x.reshape(b * t, d).astype(cfg.compute_dtype)
    valid = (segment_ids.reshape(b * t) > 0).astype(jnp.int32)

    # The router's params live directly under this module ('gate', as in HF), hence no wrapper.
    logits = Linear(cfg.num_experts, ("embed", None), cfg.replace(dtype="float32"),
                    name="gate")(flat.astype(jnp.float32))
    bias = None
    if cfg.moe_router == "sigmoid_bias":
      bias = self.param("e_score_correction_bias",
                        nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                        (cfg.num_experts,), jnp.float32)
    w, idx, probs = route(logits, cfg, bias)
    wg, wu, wd = Experts(cfg, name="experts")(d)
    act = activation(cfg.mlp_activation)
    if cfg.moe_dispatch == "capacity":
      y, dropped = dispatch_capacity(flat, idx, w, wg, wu, wd, act, valid, capacity(b * t, cfg))
    else:
      y, dropped = dispatch_dropless(flat, idx, w, wg, wu, wd, act)
    self._sow_stats(logits, idx, probs, valid, dropped)

    y = y.astype(cfg.compute_dtype).reshape(b, t, d)
    if cfg.moe_shared_intermediate_size:  # Qwen2-MoE: always-on expert behind a sigmoid gate
      xs = flat.reshape(b, t, d)
      shared = MLP(cfg, cfg.moe_shared_intermediate_size, name="shared_expert")(xs)
      g = Linear(1, ("embed", None), cfg, name="shared_expert_gate")(xs)
      y = y + jax.nn.sigmoid(g.astype(jnp.float32)).astype(y.dtype) * shared
    return y.astype(x.dtype)

  def _sow_stats(self, logits, idx, probs, valid, dropped):
    stats = router_stats(logits, idx, probs, valid, self.cfg.num_experts)
    stats["dropped"] = dropped
    for name, value in stats.items():
      self.sow("aux", name, value)


def router_stats(logits, idx, probs, valid, num_experts: int) -> dict:
  """Per-layer sums over non-padding tokens (exact under accumulation); see `collect_aux`.

  logits/probs [N, E], idx [N, k], valid [N] -> router_counts [E] (top-k assignments),
  router_prob_sum [E], router_tokens [], router_z_sum [] (sum of logsumexp(logits)^2).
  """
  m = valid.astype(jnp.float32)
  counts = jnp.zeros((num_experts,), jnp.float32).at[idx.reshape(-1)].add(
      jnp.repeat(m, idx.shape[1]))
  z = jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1))
  return dict(router_counts=counts, router_prob_sum=(probs * m[:, None]).sum(0),
              router_tokens=m.sum(), router_z_sum=(z * m).sum())


# ----------------------------------------------------------------------------- aux losses


def _find_stats(tree):
  """Finds the dict holding the sown AUX_NAMES (under layers/mlp after the scan)."""
  if isinstance(tree, dict) or hasattr(tree, "items"):
    if all(k in tree for k in AUX_NAMES):
      return {k: (tree[k][0] if isinstance(tree[k], tuple) else tree[k]) for k in AUX_NAMES}
    for v in tree.values():
      found = _find_stats(v)
      if found is not None:
        return found
  return None


def load_balancing_loss(counts, prob_sum, tokens, num_experts: int, pooled: bool = False):
  """Switch/Mixtral loss E * sum_e f_e * P_e from per-layer sums [L, E], [L, E], [L].

  f_e = top-k assignments to e / tokens (sums to k, as transformers), P_e = mean router prob.
  pooled=False: mean over layers of the per-layer loss (the Switch Transformer definition).
  pooled=True: f and P averaged over all layers' rows first, exactly what transformers'
  `load_balancing_loss_func` computes from its tuple of per-layer logits (product of means).
  """
  tokens = jnp.maximum(tokens, 1.0)
  if pooled:
    f = counts.sum(0) / tokens.sum()
    p = prob_sum.sum(0) / tokens.sum()
    return num_experts * jnp.sum(f * p)
  f = counts / tokens[:, None]
  p = prob_sum / tokens[:, None]
  return num_experts * jnp.mean(jnp.sum(f * p, axis=-1))


def collect_aux(aux_collection) -> Optional[dict]:
  """The 'aux' collection of `model.apply(..., mutable=['aux'])` -> losses and statistics.

  Returns None when the model has no MoE layer, else float32 arrays:
    lb_loss []: load-balancing loss (mean over layers), z_loss []: mean logsumexp^2,
    load [L, E]: fraction of (non-padding) assignments per expert, dropped_frac [],
    and the raw sums (counts [L, E], tokens [L], dropped [L]) for exact metric reduction.
  """
  s = _find_stats(aux_collection)
  if s is None:
    return None
  counts = jnp.atleast_2d(s["router_counts"])
  prob_sum = jnp.atleast_2d(s["router_prob_sum"])
  tokens = jnp.atleast_1d(s["router_tokens"])
  e = counts.shape[-1]
  assigned = jnp.maximum(counts.sum(-1), 1.0)  # tokens * k per layer
  dropped = jnp.atleast_1d(s["dropped"])
  return dict(
      lb_loss=load_balancing_loss(counts, prob_sum, tokens, e),
      z_loss=jnp.mean(jnp.atleast_1d(s["router_z_sum"]) / jnp.maximum(tokens, 1.0)),
      load=counts / assigned[:, None],
      dropped_frac=dropped.sum() / assigned.sum(),
      counts=counts, tokens=tokens, dropped=dropped, assigned=assigned)
