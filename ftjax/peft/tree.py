"""PEFT as pytree transforms: build the adapted params, the trainable mask, merge adapters away.

Params are nested dicts of raw arrays (unboxed). A Linear's dict holds 'kernel' (or the NF4
leaves), optional 'bias', and when adapted 'lora_A', 'lora_B' (+ 'lora_magnitude' for DoRA).
The embedding's dict ('embed_tokens') holds 'embedding' [V, D] and the same adapter leaves; with
tied embeddings an adapted LM head's dict ('lm_head') holds the adapter leaves only.
A reward model's head ('score', [hidden, 1]) is never adapted; like any module listed in
config.peft.modules_to_save it trains in full (`saved_modules`, `trainable_mask`).
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.peft import nf4
from ftjax.peft.spec import (ADAPTER_LEAVES, EMBED, HEAD, SCORE, AdapterSpec, hf_name,
                             method_of, name_hit, resolve, scaling, spec_from_config)

NF4_LEAVES = ("kernel_nf4", "kernel_absmax", "kernel_absmax_q", "kernel_absmax_scale",
              "kernel_absmax_offset")


def linear_dicts(params, path=()) -> Iterator[Tuple[Tuple[str, ...], Dict[str, Any]]]:
  """(path, dict) for every Linear-like dict (one holding a kernel) except the output layer (LM
  head or reward score)."""
  if not isinstance(params, dict):
    return
  if ("kernel" in params or "kernel_nf4" in params) and path not in (HEAD, SCORE):
    yield path, params
    return
  for k, v in params.items():
    yield from linear_dicts(v, path + (k,))


def module_dicts(params) -> Iterator[Tuple[Tuple[str, ...], Dict[str, Any]]]:
  """(path, dict) for every module LoRA can adapt: each Linear, the embedding, the LM head."""
  yield from linear_dicts(params)
  for path in (EMBED, HEAD):
    if isinstance(params.get(path[0]), dict):
      yield path, params[path[0]]


def weight_dicts(params, path=()):
  """(path, dict) for every module holding a weight: Linears, LM head, score, embeddings."""
  if not isinstance(params, dict):
    return
  if any(k in params for k in ("kernel", "kernel_nf4", "embedding")) or path == HEAD:
    yield path, params
    return
  for k, v in params.items():
    yield from weight_dicts(v, path + (k,))


def save_names(spec, params) -> Tuple[str, ...]:
  """config.peft.modules_to_save, plus a reward model's `score` head (PEFT's SEQ_CLS default)."""
  names = tuple(spec.modules_to_save) if spec is not None else ()
  if "score" in params and "score" not in names:
    names += ("score",)
  return names


def saved_modules(params, names) -> list:
  """(path, dict) of the modules named by `names` (trained in full), checked: each name selects
  something, the same modules in every stacked layer, none adapted or NF4-quantised."""
  out, used, available = [], set(), []
  for path, d in weight_dicts(params):
    leaf = next(iter(jax.tree_util.tree_leaves(d)), None)
    layers = range(leaf.shape[0]) if "layers" in path and leaf is not None else [None]
    hits = {i: [t for t in names if name_hit((t,), hf_name(path, i))] for i in layers}
    available.append(hf_name(path, 0 if "layers" in path else None))
    if not any(hits.values()):
      continue
    where = f"config.peft.modules_to_save: {hf_name(path, None)}"
    if not all(hits.values()):
      raise ValueError(f"{where} is selected in some layers only; layers are stacked (nn.scan), "
                       "so select by module name, not layer index")
    if "lora_A" in d:
      raise ValueError(f"{where} is also a LoRA target (target_modules); pick one")
    if "kernel_nf4" in d:
      raise ValueError(f"{where} is NF4-quantised (QLoRA) and cannot train in full")
    if path == HEAD and "kernel" not in d:
      raise ValueError(f"{where} is tied to the embedding (tie_embeddings); training it in full "
                       "is not supported, adapt it with LoRA instead")
    used.update(t for ts in hits.values() for t in ts)
    out.append((path, d))
  missing = [t for t in names if t not in used]
  if missing:
    raise ValueError(f"config.peft.modules_to_save={list(names)}: {missing} match no module; "
                     f"available (layer 0 shown): {available}")
  return out


def _base_shapes(model_cfg):
  from ftjax.models import Decoder  # pylint: disable=g-import-not-at-top
  base_cfg = model_cfg.replace(peft=None)
  return jax.eval_shape(lambda: nn.unbox(Decoder(base_cfg).init(
      jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]))


def _base_modules(model_cfg, shapes=None) -> list:
  """(path, (in, out)) of every adaptable module of the un-adapted model (shapes only): the
  Linears, then the embedding [V, D] and the LM head [D, V] (also when tied)."""
  shapes = _base_shapes(model_cfg) if shapes is None else shapes
  out = [(p, d["kernel"].shape[-2:]) for p, d in linear_dicts(shapes)]
  vocab, dim = shapes["embed_tokens"]["embedding"].shape
  out.append((EMBED, (vocab, dim)))
  if model_cfg.head != "reward":
    out.append((HEAD, (dim, vocab)))
  return out


def available_modules(model_cfg) -> list:
  """HF-style names of every adaptable module (layer 0 shown for stacked layers)."""
  return [hf_name(p, 0 if "layers" in p else None) for p, _ in _base_modules(model_cfg)]


def check_targets(model_cfg) -> None:
  """Errors early when target_modules selects no module (listing the available names)."""
  spec: AdapterSpec = model_cfg.peft
  shapes = _base_shapes(model_cfg)
  modules = _base_modules(model_cfg, shapes)
  hits = 0
  for path, (n_in, n_out) in modules:
    if spec.quantize == "nf4" and path not in (EMBED, HEAD):
      nf4.check_shape(n_in, spec.block_size, f"{hf_name(path, None)} (config.peft.quantize='nf4')")
    target = resolve(spec, path, model_cfg.num_layers)
    if target is None:
      continue
    hits += 1
    if target[0] > min(n_in, n_out):
      raise ValueError(f"config.peft.r / rank_pattern: rank {target[0]} > min(in, out) = "
                       f"{min(n_in, n_out)} for {hf_name(path, None)} [{n_in}, {n_out}]")
  if not hits:
    names = [hf_name(p, 0 if "layers" in p else None) for p, _ in modules]
    raise ValueError(f"config.peft.target_modules={spec.target_modules!r} matches no module; "
                     f"available (layer 0 shown): {names}")
  saved = [p for p, _ in saved_modules(shapes, save_names(spec, shapes))]
  for path in saved:
    if path in (EMBED, HEAD) and model_cfg.tie_embeddings:
      raise ValueError(f"config.peft.modules_to_save: {hf_name(path, None)} is tied to the "
                       "embedding (tie_embeddings); training it in full is not supported, adapt "
                       "it with LoRA instead")
    if path in dict(modules) and resolve(spec, path, model_cfg.num_layers) is not None:
      raise ValueError(f"config.peft.modules_to_save: {hf_name(path, None)} is also a LoRA "
                       "target (target_modules); pick one")
    if spec.quantize == "nf4" and path not in (EMBED, HEAD, SCORE):
      raise ValueError(f"config.peft.modules_to_save: {hf_name(path, None)} is NF4-quantised "
                       "(QLoRA) and cannot train in full")


def apply_peft(model_cfg, peft_cfg):
  """ModelConfig with the adapter spec from `config.peft`; unchanged for method none/hft."""
  spec = peft_cfg if isinstance(peft_cfg, AdapterSpec) else spec_from_config(peft_cfg)
  if spec is None:
    return model_cfg
  out = model_cfg.replace(peft=spec)
  check_targets(out)
  return out


def init_adapters(base_params, model, rng, sample_tokens, donate: bool = False):
  """Params of the adapted `model`: base weights copied in (quantised to NF4 when asked), LoRA A
  kaiming-uniform, B zero, DoRA magnitude = ||W||_in. Step 0 therefore equals the base model.

  Runs as one jit; the adapted model's random base init is dead code and is compiled away. New
  leaves get the logical sharding constraints of their declaration (current mesh/rules context).
  donate=True hands `base_params`' buffers to the result (unusable afterwards): the base weights
  are then never held twice, which on a weight-dominated model is the whole init peak.
  """
  spec: AdapterSpec = model.cfg.peft
  if spec is None:
    return base_params
  if any(k in d for _, d in module_dicts(base_params) for k in ADAPTER_LEAVES):
    raise ValueError("init_adapters: base params already hold adapters; "
                     "merge them first (ftjax.peft.merge)")

  def init(base, key):
    boxed = model.init({"params": key}, sample_tokens)["params"]
    fresh = nn.unbox(boxed)
    if model.cfg.tie_embeddings and "lm_head" in fresh:  # tied head: its base is the table.T
      base = dict(base, lm_head={"kernel": base["embed_tokens"]["embedding"].T})
    out = _fill(fresh, base, spec, ())
    return jax.tree_util.tree_map(
        lambda x, b: nn.with_logical_constraint(x, b.names)
        if isinstance(b, nn.LogicallyPartitioned) else x,
        out, boxed, is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))
  return jax.jit(init, donate_argnums=(0,) if donate else ())(base_params, rng)


def nf4_leaf_fn(model_cfg):
  """leaf_fn for `ftjax.models.hf.load_hf`: quantises each kernel the adapted model keeps as NF4
  as soon as it is loaded (None when nothing is quantised). Same codes as `init_adapters`."""
  spec: AdapterSpec = model_cfg.peft
  if spec is None or not spec.quantize:
    return None
  from ftjax.models import Decoder  # pylint: disable=g-import-not-at-top
  abstract = jax.eval_shape(
      lambda r: nn.unbox(Decoder(model_cfg).init(r, jnp.zeros((1, 8), jnp.int32)))["params"],
      jax.random.key(0))
  nf4_modules = {p for p, d in module_dicts(abstract) if "kernel_nf4" in d}
  quantize = jax.jit(nf4.quantize, static_argnums=(1, 2))

  def fn(path, arr):
    if path[-1] != "kernel" or tuple(path[:-1]) not in nf4_modules:
      return arr
    return quantize(arr, spec.block_size, spec.double_quant)
  return fn


def _fill(fresh, base, spec, path):
  if not isinstance(fresh, dict):
    return base
  if not isinstance(base, dict):
    raise ValueError(f"init_adapters: base params at {'/'.join(path)} are not a dict")
  out = {}
  quantised = "kernel_nf4" in fresh
  if not quantised and any(k in base for k in NF4_LEAVES):
    raise ValueError(f"init_adapters: base params at {'/'.join(path)} are NF4 but this model "
                     "does not quantise them (config.peft.method / target_modules)")
  for k, v in fresh.items():
    where = "/".join(path + (k,))
    if k in ADAPTER_LEAVES or k in NF4_LEAVES:
      continue
    if k not in base:
      raise ValueError(f"init_adapters: base params lack {where} (expected shape {v.shape})")
    if isinstance(v, dict):
      out[k] = _fill(v, base[k], spec, path + (k,))
      continue
    if base[k].shape != v.shape:
      raise ValueError(f"init_adapters: base param {where} has shape {base[k].shape}, "
                       f"the model expects {v.shape}")
    out[k] = base[k].astype(v.dtype)
  if quantised and "kernel_nf4" in base:  # quantised while loading (nf4_leaf_fn)
    out.update({k: base[k] for k in fresh if k in NF4_LEAVES})
  elif quantised:
    if "kernel" not in base:
      raise ValueError(f"init_adapters: base params lack {'/'.join(path + ('kernel',))}")
    out.update(nf4.quantize(base["kernel"], spec.block_size, spec.double_quant))
  for k in ("lora_A", "lora_B"):
    if k in fresh:
      out[k] = fresh[k]
  if "lora_magnitude" in fresh:
    w = nf4.dequantize(out, spec.block_size) if quantised else base.get("kernel",
                                                                        base.get("embedding"))
    out["lora_magnitude"] = jnp.linalg.norm(w.astype(jnp.float32), axis=-2).astype(
        fresh["lora_magnitude"].dtype)
  return out


def trainable_mask(params, peft_cfg):
  """Pytree of bools: for LoRA/DoRA/QLoRA the adapter leaves and the modules_to_save (a reward
  model's score head included) are True; all True for none/hft."""
  method = peft_cfg if isinstance(peft_cfg, str) else (
      "lora" if isinstance(peft_cfg, AdapterSpec) else method_of(peft_cfg))
  if method in ("none", "hft"):
    return jax.tree_util.tree_map(lambda _: True, params)
  spec = (peft_cfg if isinstance(peft_cfg, AdapterSpec)
          else None if isinstance(peft_cfg, str) else spec_from_config(peft_cfg))
  saved = {p for p, _ in saved_modules(params, save_names(spec, params))}
  keys = lambda p: tuple(str(getattr(k, "key", k)) for k in p)
  return jax.tree_util.tree_map_with_path(
      lambda p, _: keys(p)[-1] in ADAPTER_LEAVES or keys(p)[:-1] in saved, params)


def split_trainable(params, mask):
  """(trainable, frozen): two nested dicts with disjoint leaves; empty branches dropped."""
  def split(p, m, want):
    if isinstance(p, dict):
      out = {k: split(v, m[k], want) for k, v in p.items()}
      return {k: v for k, v in out.items()
              if v is not None and not (isinstance(v, dict) and not v)}
    return p if bool(m) == want else None
  return split(params, mask, True) or {}, split(params, mask, False) or {}


def merge_trainable(trainable, frozen):
  """Inverse of `split_trainable`."""
  if not isinstance(trainable, dict) or not isinstance(frozen, dict):
    return trainable if trainable is not None else frozen
  out = dict(frozen)
  for k, v in trainable.items():
    out[k] = merge_trainable(v, frozen[k]) if k in frozen else v
  return out


def merged_kernel(d, spec: AdapterSpec, rank: int, alpha: float, out_dtype,
                  key: str = "kernel") -> jax.Array:
  """W' = W + s*A@B (DoRA: scaled to the magnitude per output), accumulated in float32.

  `key` names the base weight: 'kernel' [in, out] or the embedding table 'embedding' [V, D].
  """
  w = nf4.dequantize(d, spec.block_size) if "kernel_nf4" in d else d[key].astype(jnp.float32)
  if "lora_A" in d:
    s = scaling(spec, rank, alpha)
    w = w + s * jnp.einsum("...ir,...ro->...io", d["lora_A"].astype(jnp.float32),
                           d["lora_B"].astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
    if "lora_magnitude" in d:
      norm = jnp.linalg.norm(w, axis=-2, keepdims=True)
      w = w * (d["lora_magnitude"].astype(jnp.float32)[..., None, :] / norm)
  return w.astype(out_dtype)


def merge(params, model_cfg):
  """(base_params, base_cfg): adapters folded into the weights, NF4 dequantised (fp32 math).

  Tied embeddings with an adapted embedding or LM head come back untied (lm_head = the base
  table's transpose + the head's own adapter): the unmerged head reads the base table only (as in
  PEFT), so folding the embedding's adapter into a shared table would change the logits.
  """
  spec: AdapterSpec = getattr(model_cfg, "peft", None)
  if spec is None:
    return params, model_cfg
  out = jax.tree_util.tree_map(lambda x: x, params)  # shallow structural copy of the dicts
  wdt = model_cfg.weight_dtype
  cfg = model_cfg.replace(peft=None)
  if (model_cfg.tie_embeddings and model_cfg.head != "reward"
      and ("lm_head" in out or "lora_A" in out["embed_tokens"])):
    head = dict(out.pop("lm_head", {}), kernel=out["embed_tokens"]["embedding"].T)
    out["lm_head"] = head
    cfg = cfg.replace(tie_embeddings=False)

  def rebuild(tree, path):
    if not isinstance(tree, dict):
      return tree
    target = lambda: resolve(spec, path, model_cfg.num_layers) or (spec.r, spec.alpha)
    if "kernel" in tree or "kernel_nf4" in tree:
      d = {k: v for k, v in tree.items() if k not in ADAPTER_LEAVES + NF4_LEAVES}
      d["kernel"] = merged_kernel(tree, spec, *target(), wdt)
      return d
    if path == EMBED and "lora_A" in tree:
      d = {k: v for k, v in tree.items() if k not in ADAPTER_LEAVES}
      d["embedding"] = merged_kernel(tree, spec, *target(), wdt, key="embedding")
      return d
    return {k: rebuild(v, path + (k,)) for k, v in tree.items()}
  return rebuild(out, ()), cfg
