"""Shared config helpers: the base ConfigDict every experiment config starts from, `parse_arg`."""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def parse_arg(arg, **defaults) -> ml_collections.ConfigDict:
  """'size=tiny,runlocal' -> ConfigDict(size='tiny', runlocal=True), typed like `defaults`."""
  out = dict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    if not _:
      out[key] = True
      continue
    if key not in defaults:
      raise ValueError(f"config arg: unknown key {key!r} (known: {sorted(defaults)})")
    kind = type(defaults[key])
    out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
  return ml_collections.ConfigDict(out)


def base_config() -> ml_collections.ConfigDict:
  """Every section with its defaults; an experiment config overrides fields, then locks."""
  from ftjax import data  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ""  # a workdir whose latest checkpoint gives the initial params (e.g. SFT -> DPO)

  c.model = ml_collections.ConfigDict(dict(
      hf_path="", vocab_size=256, hidden_size=64, intermediate_size=176, num_layers=2,
      num_heads=4, num_kv_heads=2, max_position_embeddings=2048, dtype="float32",
      param_dtype="float32", remat_policy="none", scan_unroll=1))
  c.model.attention_impl = ml_collections.config_dict.placeholder(str)

  c.data = data.default_config()
  c.data.kind = "sft"  # sft | preference | kto

  c.objective = ml_collections.ConfigDict(dict(name="sft"))

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, warmup_steps=0, schedule="cosine", final_lr_frac=0.1,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0))

  c.peft = ml_collections.ConfigDict(dict(method="none"))

  c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = ()  # empty -> ftjax.sharding.DEFAULT_RULES

  c.train = ml_collections.ConfigDict(dict(
      steps=100, batch_size=8, seq_len=64, grad_accum_steps=1, log_every=10,
      stop_at_step=0))  # stop_at_step: checkpoint and stop early, as if preempted
  c.eval = ml_collections.ConfigDict(dict(
      every=0, batches=4, batch_size=8, exact_match_examples=0, max_new_tokens=16))
  c.checkpoint = ml_collections.ConfigDict(dict(every=0, keep=3, async_save=True))
  c.checkpoint.best_metric = ml_collections.config_dict.placeholder(str)
  c.checkpoint.best_mode = "min"
  return c


def config_module(name_or_path: str):
  """The python module of a config file (a path, or a name under the repo's configs/).

  configs/ is not a package; configs that build on others load them by path here.
  """
  path = name_or_path
  if not os.path.exists(path):
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    path = os.path.join(here, path if path.endswith(".py") else path + ".py")
    if not os.path.exists(path):
      raise FileNotFoundError(f"config {name_or_path!r}: no such file")
  name = "ftjax_config_" + os.path.splitext(os.path.basename(path))[0]
  mod_spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod


def load_config(spec: str) -> ml_collections.ConfigDict:
  """'configs/x.py[:arg]' or 'x[:arg]' -> that file's get_config(arg)."""
  path, _, arg = spec.partition(":")
  return config_module(path).get_config(arg or None)
