"""Half Fine-Tuning (Hui et al. 2024, arXiv:2404.18466): each round, freeze half of the parameter
groups of every layer and train the other half; full fine-tuning otherwise.

Our reading of the paper's category-level selection, per layer and per round:
  - attention: 2 of the 4 projections (q, k, v, o) are trained;
  - MLP: of the gated MLP's 3 projections, 2 are trained in one layer and 1 in the next
    (alternating, so half over each pair of layers; which parity gets 2 is random per round);
    a 2-projection MLP (GPT-2) trains 1;
  - norms, embeddings, the LM head and anything else (e.g. MoE experts) stay trainable.
The selection is a pure function of (step // round_len, seed): resuming at step s reproduces it.

Since layers are stacked, the mask of a stacked leaf is a float array [L, 1, ..., 1] that
broadcasts against the leaf; the train loop multiplies it into the optimizer updates (so a frozen
group is not moved; its Adam moments still see its gradients).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _choose(key, n_layers, n_groups, n_train):
  """[L, n_groups] float: n_train[l] groups per layer l picked at random (0/1)."""
  keys = jax.random.split(key, n_layers)
  ranks = jax.vmap(lambda k: jnp.argsort(jax.random.uniform(k, (n_groups,))))(keys)
  return (ranks < n_train[:, None]).astype(jnp.float32)


def _layer_selection(params, step, round_len, seed):
  """{('self_attn', name) or ('mlp', name): [L] multiplier} for the stacked layers."""
  layers = params.get("layers", {})
  attn = [n for n in ATTN if n in layers.get("self_attn", {})]
  mlp = [n for n in MLP if n in layers.get("mlp", {}) and "kernel" in layers["mlp"][n]]
  leaves = jax.tree_util.tree_leaves(layers)
  if not leaves:
    return {}
  n_layers = leaves[0].shape[0]
  key = jax.random.fold_in(jax.random.key(seed), step // round_len)
  k_attn, k_mlp, k_par = jax.random.split(key, 3)
  out = {}
  if attn:
    sel = _choose(k_attn, n_layers, len(attn), jnp.full((n_layers,), len(attn) // 2))
    out.update({("self_attn", n): sel[:, i] for i, n in enumerate(attn)})
  if mlp:
    parity = jax.random.bernoulli(k_par).astype(jnp.int32)
    extra = (jnp.arange(n_layers) + parity) % 2 if len(mlp) % 2 else 0
    sel = _choose(k_mlp, n_layers, len(mlp), len(mlp) // 2 + extra * jnp.ones(n_layers, jnp.int32))
    out.update({("mlp", n): sel[:, i] for i, n in enumerate(mlp)})
  return out


def hft_mask(params, step, round_len: int, seed: int = 0):
  """Pytree like `params` of float multipliers (1 = train, 0 = frozen this round).

  step may be traced (inside the jitted train step). Leaves outside the selected groups get 1.0.
  """
  if round_len <= 0:
    raise ValueError(f"config.peft.round_len={round_len}: must be > 0")
  sel = _layer_selection(params, step, round_len, seed)

  def leaf(path, x):
    keys = tuple(str(getattr(k, "key", k)) for k in path)
    if len(keys) >= 3 and keys[0] == "layers" and keys[1:3] in sel:
      m = sel[keys[1:3]]
      return m.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
    return jnp.ones((), x.dtype)
  return jax.tree_util.tree_map_with_path(leaf, params)


def hft_update_scale_fn(trainable, peft_cfg):
  """step -> multipliers for the updates of `trainable` (what the train loop calls)."""
  get = peft_cfg.get if hasattr(peft_cfg, "get") else lambda k, d=None: getattr(peft_cfg, k, d)
  round_len = int(get("round_len", 100) or 100)
  seed = int(get("seed", 0) or 0)
  if round_len <= 0:
    raise ValueError(f"config.peft.round_len={round_len}: must be > 0")
  return lambda step: hft_mask(trainable, step, round_len, seed)
