"""Adapters in Hugging Face PEFT format: adapter_config.json + adapter_model.safetensors.

Keys are `base_model.model.<HF module name>.lora_A.weight` [r, in], `...lora_B.weight` [out, r]
and `...lora_magnitude_vector` [out] (DoRA), one per layer (our stacked [L, ...] arrays are split).
The embedding uses PEFT's lora.Embedding keys `base_model.model.model.embed_tokens.lora_embedding_A`
[r, V] and `...lora_embedding_B` [D, r]; the LM head is `base_model.model.lm_head.lora_A.weight`.
Modules trained in full (modules_to_save, a reward model's `score` head) are saved whole as PEFT
saves them: `base_model.model.<HF module name>.weight` (HF layout, [out, in]) and `.bias`; a
reward model's adapter has task_type SEQ_CLS and loads on `AutoModelForSequenceClassification`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.peft.spec import EMBED, HEAD, AdapterSpec, hf_name, name_hit, resolve
from ftjax.peft.tree import (init_adapters, linear_dicts, module_dicts, save_names,
                             saved_modules, weight_dicts)

_PREFIX = "base_model.model."
_LAYOUT_UNSUPPORTED = ("gpt2",)  # HF fuses q/k/v into c_attn: no 1:1 module names


def _layers(path, arr) -> list:
  return list(range(arr.shape[0])) if "layers" in path else [None]


def _keys(path):
  """(our leaf, PEFT key suffix, transposed?) of one module's adapter tensors."""
  a, b = (("lora_embedding_A", "lora_embedding_B") if path == EMBED
          else ("lora_A.weight", "lora_B.weight"))
  magnitude = ("lora_magnitude", "lora_magnitude_vector", False)
  return ("lora_A", a, True), ("lora_B", b, True), magnitude


def _target_modules(params, spec, num_layers):
  """A leaf-name list when it selects exactly our adapted modules (as PEFT would), else a regex."""
  adapted, leaves_all = set(), {}
  for path, d in module_dicts(params):
    leaves_all.setdefault(path[-1], []).append("lora_A" in d)
    if "lora_A" in d:
      adapted.add(path)
  leaf_names = sorted({p[-1] for p in adapted})
  if all(all(leaves_all[n]) for n in leaf_names):
    return leaf_names
  alts = "|".join(sorted(re.escape(hf_name(p, 0 if "layers" in p else None))
                         .replace(r"layers\.0\.", r"layers\.\d+\.") for p in adapted))
  return alts


def export_adapter(params, model_cfg, out_dir: str,
                   base_model_name_or_path: Optional[str] = None) -> str:
  """Writes a PEFT LoRA adapter dir that `peft.PeftModel.from_pretrained` loads."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  spec: AdapterSpec = getattr(model_cfg, "peft", None)
  if spec is None:
    raise ValueError("export_adapter: model_cfg has no adapter (config.peft.method is none/hft)")
  if model_cfg.family in _LAYOUT_UNSUPPORTED:
    raise ValueError(f"export_adapter: family {model_cfg.family!r} has fused HF projections; "
                     "export a merged model instead (ftjax export without --adapter)")
  if getattr(model_cfg, "num_experts", 0) and any(  # MoE engineer: no PEFT format for these
      "lora_A" in d and ("experts" in p or p[-2:] == ("mlp", "gate"))
      for p, d in linear_dicts(params)):
    raise ValueError("export_adapter: LoRA on MoE experts / router has no PEFT adapter format "
                     "here; export a merged model instead (ftjax export without --adapter)")
  tensors, rank_pattern, alpha_pattern = {}, {}, {}
  for path, d in module_dicts(params):
    if "lora_A" not in d:
      continue
    rank, alpha = resolve(spec, path, model_cfg.num_layers)
    for i in _layers(path, d["lora_A"]):
      name = _PREFIX + hf_name(path, i)
      for leaf, suffix, transpose in _keys(path):
        if leaf in d:
          x = np.asarray(d[leaf] if i is None else d[leaf][i], np.float32)
          tensors[f"{name}.{suffix}"] = np.ascontiguousarray(x.T if transpose else x)
      if rank != spec.r:
        rank_pattern[hf_name(path, i)] = rank
      if alpha != spec.alpha:
        alpha_pattern[hf_name(path, i)] = _num(alpha)
  to_save = save_names(spec, params)
  for path, d in saved_modules(params, to_save):
    for leaf, suffix in _full_keys(d):
      for i in _layers(path, d[leaf]):
        x = np.asarray(d[leaf] if i is None else d[leaf][i], np.float32)
        tensors[f"{_PREFIX}{hf_name(path, i)}.{suffix}"] = np.ascontiguousarray(
            x.T if leaf == "kernel" else x)
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
  config = dict(
      peft_type="LORA", task_type="SEQ_CLS" if "score" in params else "CAUSAL_LM",
      base_model_name_or_path=base_model_name_or_path,
      r=spec.r, lora_alpha=_num(spec.alpha), lora_dropout=spec.dropout,
      target_modules=_target_modules(params, spec, model_cfg.num_layers),
      use_rslora=spec.use_rslora, use_dora=spec.use_dora, rank_pattern=rank_pattern,
      alpha_pattern=alpha_pattern, bias="none", fan_in_fan_out=False, init_lora_weights=True,
      inference_mode=True, modules_to_save=list(to_save) or None, layers_to_transform=None,
      layers_pattern=None)
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return out_dir


def _full_keys(d):
  """(our leaf, HF parameter name) of a module saved whole: a Linear's kernel (transposed to HF's
  [out, in]) and bias, or an embedding table."""
  return [(leaf, "weight" if leaf in ("kernel", "embedding") else leaf)
          for leaf in ("kernel", "embedding", "bias") if leaf in d]


def _num(x):
  return int(x) if float(x).is_integer() else float(x)


_UNSUPPORTED = {"layers_to_transform": None, "layers_pattern": None, "bias": "none",
                "fan_in_fan_out": False, "lora_bias": False,
                "exclude_modules": None, "layer_replication": None, "target_parameters": None,
                "trainable_token_indices": None, "use_qalora": False, "use_bdlora": None,
                "ensure_weight_tying": False}


def spec_from_adapter_config(cfg: dict, where: str, base: Optional[AdapterSpec],
                             modules=()) -> AdapterSpec:
  """AdapterSpec of a PEFT adapter_config.json. `modules`: HF names of the base model's modules;
  modules_to_save entries that name none of them are dropped (PEFT's SEQ_CLS task always lists
  'classifier' and 'score', and ignores the one a model lacks)."""
  if cfg.get("peft_type") != "LORA":
    raise ValueError(f"{where}: peft_type={cfg.get('peft_type')!r}; only LORA is supported")
  for key, default in _UNSUPPORTED.items():
    if cfg.get(key, default) not in (default, [], {}, ""):
      raise ValueError(f"{where}: {key}={cfg[key]!r} is not supported by ftjax")
  target = cfg.get("target_modules")
  if target is None:
    raise ValueError(f"{where}: target_modules is missing")
  if not isinstance(target, str):
    target = tuple(target)
  quant = dict(quantize=base.quantize, block_size=base.block_size,
               double_quant=base.double_quant) if base is not None else {}
  save = cfg.get("modules_to_save") or ()
  save = tuple(t for t in ([save] if isinstance(save, str) else save)
               if any(name_hit((t,), m) for m in modules))
  return AdapterSpec(
      r=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", 8)),
      dropout=float(cfg.get("lora_dropout", 0.0)), target_modules=target,
      rank_pattern=tuple(sorted((cfg.get("rank_pattern") or {}).items())),
      alpha_pattern=tuple(sorted((cfg.get("alpha_pattern") or {}).items())),
      use_rslora=bool(cfg.get("use_rslora", False)), use_dora=bool(cfg.get("use_dora", False)),
      modules_to_save=save, **quant)


def load_adapter(adapter_dir: str, base_params, model_cfg):
  """(params, model_cfg) of the base model with a PEFT LoRA/DoRA adapter dir loaded on top.

  Keeps the NF4 settings of model_cfg.peft if it has one (QLoRA base). Errors name the file and
  key on missing/extra tensors and on shapes that do not fit the base model.
  """
  from ftjax.models import Decoder  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  cpath = os.path.join(adapter_dir, "adapter_config.json")
  wpath = os.path.join(adapter_dir, "adapter_model.safetensors")
  for p in (cpath, wpath):
    if not os.path.exists(p):
      raise FileNotFoundError(f"load_adapter: {p} not found (PEFT adapter dirs hold "
                              "adapter_config.json and adapter_model.safetensors)")
  with open(cpath) as f:
    acfg = json.load(f)
  names = [hf_name(p, 0 if "layers" in p else None) for p, _ in weight_dicts(base_params)]
  spec = spec_from_adapter_config(acfg, cpath, getattr(model_cfg, "peft", None), names)
  cfg = model_cfg.replace(peft=spec)
  params = init_adapters(base_params, Decoder(cfg), jax.random.key(0),
                         jnp.zeros((1, 2), jnp.int32))
  tensors = load_file(wpath)
  used = set()

  def take(key, shape, dtype):
    if key not in tensors:
      raise ValueError(f"{wpath}: missing tensor {key}")
    t = tensors[key]
    if tuple(t.shape) != tuple(shape):
      raise ValueError(f"{wpath}: {key} has shape {tuple(t.shape)}, the base model "
                       f"({model_cfg.family}, hidden {model_cfg.hidden_size}) expects "
                       f"{tuple(shape)}")
    used.add(key)
    return np.asarray(t, np.float32).astype(dtype)

  _load_embedding_weights(params, cfg, tensors, take)
  for path, d in saved_modules(params, save_names(spec, params)):
    if path in (EMBED, HEAD):  # read above (PEFT's embedding-layer keys are the same)
      continue
    for leaf, suffix in _full_keys(d):
      arr = d[leaf]
      per = []
      for i in _layers(path, arr):
        one = arr[i] if i is not None else arr
        shape = one.shape[::-1] if leaf == "kernel" else one.shape
        t = take(f"{_PREFIX}{hf_name(path, i)}.{suffix}", shape, arr.dtype)
        per.append(t.T if leaf == "kernel" else t)
      stacked = np.stack(per) if "layers" in path else per[0]
      d[leaf] = jax.device_put(np.ascontiguousarray(stacked), arr.sharding)
  for path, d in module_dicts(params):
    if "lora_A" not in d:
      continue
    for leaf, suffix, transpose in _keys(path):
      if leaf not in d:
        continue
      arr = d[leaf]
      per = []
      for i in _layers(path, arr):
        one = arr[i] if i is not None else arr
        shape = one.shape[::-1] if transpose else one.shape
        t = take(f"{_PREFIX}{hf_name(path, i)}.{suffix}", shape, arr.dtype)
        per.append(t.T if transpose else t)
      stacked = np.stack(per) if "layers" in path else per[0]
      d[leaf] = jax.device_put(stacked, arr.sharding)
  extra = sorted(set(tensors) - used)
  if extra:
    raise ValueError(f"{wpath}: {len(extra)} tensors match no adapted module of the base "
                     f"model (first: {extra[:3]}); check target_modules")
  return params, cfg


def _load_embedding_weights(params, cfg, tensors, take):
  """PEFT saves the base embedding / LM head next to their adapters (save_embedding_layers) and
  loads them over the base model's; so do we. A tied head's copy must equal the table."""
  emb = params["embed_tokens"]
  shape = emb["embedding"].shape
  for path in (EMBED, HEAD):
    name = _PREFIX + hf_name(path, None)
    key = next((k for k in (f"{name}.base_layer.weight", f"{name}.weight") if k in tensors), None)
    if key is None:
      continue
    w = take(key, shape, emb["embedding"].dtype)  # HF [V, D] for both
    if path == EMBED:
      emb["embedding"] = jax.device_put(w, emb["embedding"].sharding)
    elif not cfg.tie_embeddings:
      if "lm_head" not in params:
        raise ValueError(f"{key}: the base model has no lm_head (head={cfg.head!r})")
      head = params["lm_head"]
      head["kernel"] = jax.device_put(np.ascontiguousarray(w.T), head["kernel"].sharding)
    elif not np.array_equal(w, np.asarray(emb["embedding"])):
      raise ValueError(f"{key} differs from the embedding table, but the base model ties them "
                       "(tie_embeddings=True); load the adapter on an untied base")
