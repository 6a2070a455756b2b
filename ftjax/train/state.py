"""Model, params (created already sharded), trainable/frozen split and optimizer state."""

from __future__ import annotations

import os
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax import sharding as shd
from ftjax.models import Decoder, ModelConfig, from_config_dict


def model_config(config, tokenizer=None) -> ModelConfig:
  """ModelConfig from config.model, or from the HF dir at config.model.hf_path."""
  mc = config.model
  if mc.get("hf_path"):
    from ftjax.models import hf  # pylint: disable=g-import-not-at-top
    cfg = hf.config_from_hf(mc.hf_path)
    overrides = {k: mc[k] for k in ("dtype", "param_dtype", "attention_impl", "remat_policy",
                                    "scan_unroll") if k in mc}
    cfg = cfg.replace(**overrides)
  else:
    cfg = from_config_dict(mc)
    if tokenizer is not None and cfg.vocab_size < len(tokenizer):
      raise ValueError(f"config.model.vocab_size={cfg.vocab_size} < tokenizer size "
                       f"{len(tokenizer)}")
  return cfg


def _peft_on(config) -> bool:
  return "peft" in config and config.peft.get("method", "none") not in ("none", "", None)


def init_params(config, model_cfg: ModelConfig, mesh, rules, rng) -> Tuple[Any, Any]:
  """Returns (model_cfg, params) with params placed on their shardings.

  Shapes come from `jax.eval_shape(init)`, shardings from the logical axis rules, and the init is
  jitted with those out_shardings so no full copy ever sits on one device.
  """
  if _peft_on(config):
    from ftjax import peft  # pylint: disable=g-import-not-at-top
    full_cfg = peft.apply_peft(model_cfg, config.peft)
  else:
    full_cfg = model_cfg
  base = _base_params(config, model_cfg, mesh, rules, rng, full_cfg)
  if full_cfg is model_cfg:
    return full_cfg, base
  from ftjax import peft  # pylint: disable=g-import-not-at-top
  model = Decoder(full_cfg)
  with shd.mesh_rules(mesh, rules):
    params = peft.init_adapters(base, model, jax.random.fold_in(rng, 1),
                                jnp.zeros((1, 8), jnp.int32), donate=True)
  return full_cfg, params


def param_shardings(model_cfg: ModelConfig, mesh, rules):
  model = Decoder(model_cfg)
  init = lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"]
  abstract = jax.eval_shape(init, jax.random.key(0))
  return init, shd.logical_shardings(abstract, mesh, rules)


def _base_params(config, model_cfg, mesh, rules, rng, full_cfg=None):
  mc = config.model
  if mc.get("hf_path"):
    from ftjax.models import hf  # pylint: disable=g-import-not-at-top
    leaf_fn = None
    if full_cfg is not None and full_cfg is not model_cfg:  # QLoRA: NF4 as each leaf loads
      from ftjax import peft  # pylint: disable=g-import-not-at-top
      leaf_fn = peft.tree.nf4_leaf_fn(full_cfg)
    _, params = hf.load_hf(mc.hf_path, mesh=mesh, rules=rules, dtype=model_cfg.dtype,
                           param_dtype=model_cfg.param_dtype, leaf_fn=leaf_fn)
    return params
  init, shardings = param_shardings(model_cfg, mesh, rules)
  if config.get("init_from"):
    return load_init_from(config.init_from, shardings)
  with shd.mesh_rules(mesh, rules):
    return jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)


def load_init_from(workdir: str, shardings):
  """Params of the latest checkpoint of another run (e.g. the SFT run a DPO run starts from)."""
  from ftjax.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  ckdir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckdir):
    raise FileNotFoundError(f"config.init_from: no checkpoints in {ckdir}")
  from ftjax.train.step import merge_params  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  ck = Checkpointer(ckdir, ml_collections.ConfigDict({"async_save": False}))
  trainable, frozen, _ = ck.restore_params()
  ck.close()
  params = merge_params(trainable, frozen)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  if any("lora_" in p for p in paths):
    raise ValueError(f"config.init_from={workdir}: checkpoint has LoRA adapters; start from "
                     "its merged export (ftjax export + config.model.hf_path) instead")
  if "score" in shardings and "score" not in params:  # reward model (head='reward') from an LM
    from ftjax.models.reward import from_causal_lm  # pylint: disable=g-import-not-at-top
    params = from_causal_lm(params, jax.random.key(0),
                            np.shape(params["embed_tokens"]["embedding"])[-1])
  try:
    return jax.tree_util.tree_map(put_global, params, shardings)
  except ValueError as e:
    raise ValueError(f"config.init_from={workdir}: checkpoint params do not match "
                     f"config.model ({e})") from e


def put_global(x, sharding):
  """Host array -> global jax.Array on `sharding` (each process fills its addressable shards)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def split_params(config, params):
  """(trainable, frozen) dicts. Full fine-tuning: everything trainable, frozen empty."""
  if not _peft_on(config):
    return params, {}
  from ftjax import peft  # pylint: disable=g-import-not-at-top
  mask = peft.trainable_mask(params, config.peft)
  return peft.split_trainable(params, mask)


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
