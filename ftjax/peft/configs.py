"""config.peft sections, and PEFT variants of any experiment config (used by configs/*.py)."""

from __future__ import annotations

import ml_collections


def default_config(method: str, **overrides) -> ml_collections.ConfigDict:
  """config.peft with every key present (so --config.peft.X flags work on a locked config).

  target_modules and modules_to_save hold a string or a list, so they are typed `object`: the
  command line then parses `--config.peft.target_modules='("q_proj","v_proj")'` as a tuple and
  keeps `all-linear` or a regex as a string.
  """
  p = dict(method=method, r=8, alpha=16.0, dropout=0.0, target_modules="all-linear",
           modules_to_save=(), rank_pattern={}, alpha_pattern={}, use_rslora=False,
           use_dora=method == "dora", quantize="nf4" if method == "qlora" else "", block_size=64,
           double_quant=False, round_len=100, seed=0)
  p.update(overrides)
  for key in ("target_modules", "modules_to_save"):
    p[key] = ml_collections.FieldReference(p[key], field_type=object)
  return ml_collections.ConfigDict(p)


def derive(base: str, method: str, lr=None, init: str = "", **peft_kw):
  """`base` ('sft_tiny:steps=600', a configs/ name or path) with config.peft set.

  PEFT usually wants a larger lr than full fine-tuning (`lr`; None keeps the base's) and no
  weight decay on the adapters; `init` starts from another run's checkpoint.
  """
  from ftjax.config import load_config  # pylint: disable=g-import-not-at-top
  c = load_config(base)
  c.peft = default_config(method, **peft_kw)
  if lr is not None:
    c.optim.lr = lr
    c.optim.weight_decay = 0.0
  if init:
    c.init_from = init
  return c
