"""Import and export of local Hugging Face model dirs (config.json + safetensors + tokenizer).

    cfg, params = load_hf("/ckpt/Llama-3.2-1B", mesh=mesh)      # params placed on shardings
    logits = Decoder(cfg).apply({"params": params}, tokens)
    export_hf(params, cfg, "/out/hf", tokenizer="/ckpt/Llama-3.2-1B")

Loading goes tensor by tensor: the model's abstract params (`jax.eval_shape` of init) give every
target's shape, dtype and NamedSharding; each target is filled on the host from its HF tensors
(per-layer tensors stacked into the scanned [L, ...] layout), placed on its sharding and freed
before the next, so host memory holds the model once plus one stacked tensor.
Family details live in `hf_config.py` (config) and `hf_weights.py` (tensor names).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import shutil
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ftjax import sharding as shd
from ftjax.models import hf_io
from ftjax.models.config import ModelConfig
from ftjax.models.hf_config import (FAMILIES, config_from_hf, config_to_hf,  # noqa: F401
                                    optional_dtype, read_hf_config, register_family)
from ftjax.models.hf_weights import ALIASES, Rule, register_table, table_for  # noqa: F401
from ftjax.models import hf_moe  # noqa: F401  registers Mixtral, Qwen2-MoE, Qwen3-MoE
from ftjax.models.transformer import Decoder

DEFAULT_SHARD_BYTES = 5 << 30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
# Non-architecture config.json fields carried over from the source checkpoint on export.
_KEEP_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache",
              "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop")


def abstract_params(cfg: ModelConfig):
  """Boxed ShapeDtypeStructs of `Decoder(cfg)` params (carry logical axis names)."""
  model = Decoder(cfg)
  return jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 1), jnp.int32))["params"],
                        jax.random.key(0))


def _indices(rule: Rule, shape) -> list:
  """[(hf_name, leading index tuple)] for each layer/expert slice the rule covers."""
  n = len(rule.placeholders)
  out = []
  for idx in itertools.product(*(range(s) for s in shape[:n])):
    out.append((rule.hf.format(**dict(zip(rule.placeholders, idx))), idx))
  return out


def _hf_shape(rule: Rule, flat, n_lead: int) -> Tuple[int, ...]:
  """Shape of one HF tensor of `rule` implied by the ftjax params it feeds."""
  shapes = [flat[p].shape[n_lead:] for p in rule.paths]
  shape = list(shapes[0])
  if len(shapes) > 1:
    shape[-1] = sum(s[-1] for s in shapes)
  if rule.kind == "expert_linear":  # [E, in, out] <-> HF's stacked [E, out, in]
    return tuple(shape[:-2]) + (shape[-1], shape[-2])
  return tuple(reversed(shape)) if rule.kind == "linear" else tuple(shape)


def _to_from_hf(arr, kind: str):
  """The transposition between an HF tensor and ftjax's layout (its own inverse)."""
  if kind == "linear":
    return arr.T
  if kind == "expert_linear":
    return np.swapaxes(arr, -1, -2)
  return arr


def _plan(cfg: ModelConfig, flat: Dict[Tuple[str, ...], Any], where: str, names=None):
  """Checks the table covers exactly the model's params; returns (rules, ignore patterns)."""
  rules, ignore = table_for(cfg, names)
  covered = set()
  for rule in rules:
    for p in rule.paths:
      if p not in flat:
        raise ValueError(f"{where}: HF tensor {rule.hf!r} maps to ftjax param "
                         f"{'/'.join(p)}, which model family {cfg.family!r} does not have")
      if p in covered:
        raise ValueError(f"{where}: ftjax param {'/'.join(p)} is mapped twice")
      covered.add(p)
  extra = sorted("/".join(p) for p in set(flat) - covered)
  if extra:
    raise ValueError(f"{where}: ftjax params {extra} have no HF tensor name "
                     "(unmerged adapters? merge them before export)")
  return rules, ignore


def _resolve(name: str, tensors, family: str) -> Optional[str]:
  if name in tensors:
    return name
  alias = ALIASES.get(family)
  if alias and name.startswith(alias[0]):
    alt = alias[1] + name[len(alias[0]):]
    if alt in tensors:
      return alt
  return None


def _place(buf: np.ndarray, sharding):
  if sharding is None:
    return jax.device_put(buf)
  return jax.make_array_from_callback(buf.shape, sharding, lambda idx: buf[idx])


def _aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
  """np.empty with 64-byte-aligned data: XLA:CPU then adopts the buffer instead of copying it,
  so on CPU the loaded model is not held twice (numpy alone only guarantees 16 bytes)."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  raw = np.empty(nbytes + align, np.uint8)
  off = (-raw.ctypes.data) % align
  return raw[off:off + nbytes].view(dtype).reshape(shape)


def _assign(dst: np.ndarray, src: np.ndarray, tile: int = 128):
  """dst[...] = src. A transposed (non-contiguous) src is copied in cache-sized tiles: numpy's
  element-strided transpose copy is ~7x slower and dominated load time."""
  if src.ndim < 2 or src.flags.c_contiguous:
    dst[...] = src
    return
  rows, cols = src.shape[-2:]
  for i in range(0, rows, tile):
    for j in range(0, cols, tile):
      dst[..., i:i + tile, j:j + tile] = src[..., i:i + tile, j:j + tile]


def _prefetched(fn, items):
  """Yields (item, fn(item)), computing the next fn(item) in a thread meanwhile: file reads
  (which release the GIL) overlap the transposes of the previous tensor."""
  with concurrent.futures.ThreadPoolExecutor(1) as ex:
    nxt = ex.submit(fn, items[0]) if items else None
    for k, item in enumerate(items):
      cur = nxt.result()
      if k + 1 < len(items):
        nxt = ex.submit(fn, items[k + 1])
      yield item, cur


def _load_rule(rule, flat, shard_flat, reader, names, where):
  """Fills the ftjax params of one rule from its HF tensors; returns {path: placed array}."""
  targets = [flat[p] for p in rule.paths]
  bufs = [_aligned_empty(t.shape, t.dtype) for t in targets]
  splits = np.cumsum([t.shape[-1] for t in targets])[:-1]

  def fetch(item):
    real, idx = item
    direct = (rule.kind == "copy" and len(bufs) == 1
              and reader.tensors[real].dtype == bufs[0].dtype)
    if direct:  # straight into the destination, no temporary
      reader.read(real, out=bufs[0][idx] if idx else bufs[0])
      return None
    return reader.read(real)

  for (_, idx), arr in _prefetched(fetch, names):
    if arr is None:
      continue
    arr = _to_from_hf(arr, rule.kind)
    parts = np.split(arr, splits, axis=-1) if len(bufs) > 1 else [arr]
    for b, part in zip(bufs, parts):
      _assign(b[idx], part)
  return {p: _place(b, shard_flat.get(p) if shard_flat else None)
          for p, b in zip(rule.paths, bufs)}


def load_hf(path: str, *, mesh=None, rules=None, dtype=None,
            param_dtype=None, leaf_fn=None) -> Tuple[ModelConfig, Dict[str, Any]]:
  """(ModelConfig, params) from a local HF dir; params are raw arrays (placed if `mesh`).

  dtype / param_dtype override the compute / storage dtypes (default float32 / float32;
  param_dtype="bfloat16" keeps a bf16 checkpoint at its size).
  leaf_fn(path, array) -> array | {leaf name: array} transforms each param as soon as it is
  loaded (a dict replaces the leaf by its entries in the same module), e.g. QLoRA's NF4
  quantisation: the full-precision model is then never in memory, only one stacked leaf of it.
  Raises ValueError naming the tensor for a missing, unexpected or mis-shaped tensor.
  """
  path = os.fspath(path)
  cfg = config_from_hf(path)
  over = {k: optional_dtype(v) for k, v in (("dtype", dtype), ("param_dtype", param_dtype))
          if v is not None}
  cfg = cfg.replace(**over)
  boxed = abstract_params(cfg)
  shard_flat = None
  if mesh is not None:
    shardings = shd.logical_shardings(boxed, mesh, shd.rules_from_config(rules))
    shard_flat = traverse_util.flatten_dict(shardings)
  flat = traverse_util.flatten_dict(nn.unbox(boxed))
  tensors = hf_io.checkpoint_index(path)
  table, ignore = _plan(cfg, flat, path, names=tensors)  # names: MoE v4 vs v5 expert layout

  jobs, used, missing = [], set(), []
  for rule in table:
    n_lead = len(rule.placeholders)
    want = _hf_shape(rule, flat, n_lead)
    names = []
    for name, idx in _indices(rule, flat[rule.paths[0]].shape):
      real = _resolve(name, tensors, cfg.family)
      if real is None:
        missing.append(name)
        continue
      if tensors[real].shape != want:
        raise ValueError(f"{path}: tensor {real!r} has shape {tensors[real].shape}, expected "
                         f"{want} for config.json of model_type {cfg.family!r}")
      used.add(real)
      names.append((real, idx))
    jobs.append((rule, names))
  if missing:
    raise ValueError(f"{path}: missing tensor(s) {missing[:8]}"
                     f"{' and %d more' % (len(missing) - 8) if len(missing) > 8 else ''}")
  unexpected = sorted(t for t in tensors if t not in used and not any(p.match(t) for p in ignore))
  if unexpected:
    raise ValueError(f"{path}: unexpected tensor(s) {unexpected[:8]} for model_type "
                     f"{cfg.family!r} with this config.json")

  out = {}
  with hf_io.Reader(tensors) as reader:
    for rule, names in jobs:
      loaded = _load_rule(rule, flat, shard_flat, reader, names, path)
      for p in list(loaded):
        arr = loaded.pop(p)
        res = arr if leaf_fn is None else leaf_fn(p, arr)
        del arr  # the full-precision leaf goes as soon as it is transformed
        if isinstance(res, dict):
          out.update({p[:-1] + (k,): v for k, v in res.items()})
        else:
          out[p] = res
  return cfg, traverse_util.unflatten_dict(out)


def _export_config(cfg: ModelConfig, base_config, tokenizer) -> Dict[str, Any]:
  d = config_to_hf(cfg)
  if base_config is not None:
    base = read_hf_config(base_config)
    d.update({k: base[k] for k in _KEEP_KEYS if k in base})
  if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
      v = getattr(tokenizer, k, None)
      if k not in d and v is not None:
        d[k] = v
  return d


def _save_tokenizer(tokenizer, out_dir: str):
  if tokenizer is None:
    return
  if isinstance(tokenizer, (str, os.PathLike)):
    for fname in TOKENIZER_FILES:
      src = os.path.join(tokenizer, fname)
      if os.path.exists(src):
        shutil.copyfile(src, os.path.join(out_dir, fname))
  else:
    tokenizer.save_pretrained(out_dir)


def export_plan(table, flat, dtype=None):
  """([(hf name, np dtype, hf shape)] sorted by name, generator of those arrays in order).

  table: weight rules (hf_weights); flat: flattened ftjax params. Arrays leave the device one
  at a time, converted to HF layout (transposes, fused splits) and to `dtype` if given.
  """
  out_dtype = np.dtype(jnp.dtype(dtype)) if dtype is not None else None
  items = []
  for rule in table:
    shape = _hf_shape(rule, flat, len(rule.placeholders))
    dt = out_dtype or np.dtype(flat[rule.paths[0]].dtype)
    for name, idx in _indices(rule, flat[rule.paths[0]].shape):
      items.append((name, dt, shape, rule, idx))
  items.sort(key=lambda x: x[0])

  def produce():
    for _, dt, _, rule, idx in items:
      parts = [np.asarray(flat[p][idx] if idx else flat[p]) for p in rule.paths]
      arr = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
      arr = _to_from_hf(arr, rule.kind)
      yield np.ascontiguousarray(arr.astype(dt, copy=False))
  return [(n, d, shp) for n, d, shp, _, _ in items], produce


def export_hf(params, cfg: ModelConfig, out_dir: str, tokenizer=None,
              shard_size_bytes: int = DEFAULT_SHARD_BYTES, *, base_config=None,
              dtype=None) -> str:
  """Writes an HF dir that `transformers.AutoModelForCausalLM.from_pretrained` loads.

  params: (un)boxed param tree of `Decoder(cfg)` (merge adapters first). tokenizer: a HF
  tokenizer (saved with save_pretrained) or a dir whose tokenizer files are copied.
  base_config: source config.json (dir, file or dict) whose token ids etc. are kept.
  dtype: tensor dtype on disk (default: the params' own dtype, so a round trip is bit-exact).
  Tensors stream from device to disk one at a time.
  """
  params = nn.unbox(params)
  flat = traverse_util.flatten_dict(params)
  table, _ = _plan(cfg, flat, f"export to {out_dir}")
  items, produce = export_plan(table, flat, dtype)
  os.makedirs(out_dir, exist_ok=True)
  # config.json states the dtype actually written, whatever cfg.param_dtype says.
  exp_cfg = cfg.replace(param_dtype=items[0][1].name)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(_export_config(exp_cfg, base_config, tokenizer), f, indent=2, sort_keys=True)
  hf_io.write_checkpoint(out_dir, items, produce(), shard_size_bytes)
  _save_tokenizer(tokenizer, out_dir)
  if base_config is not None and isinstance(base_config, (str, os.PathLike)):
    src = os.path.join(os.fspath(base_config), "generation_config.json")
    if os.path.isfile(src):
      shutil.copyfile(src, os.path.join(out_dir, "generation_config.json"))
  return out_dir
