"""ORPO (odds-ratio term + NLL on the chosen sequence, no reference) on the arithmetic pairs.

  ftjax train --config configs/orpo_tiny.py:sft=runs/sft_tiny --workdir runs/orpo_tiny

ORPO is meant to replace SFT: `sft=` may be '' to start from random weights.
"""

from ftjax.config import config_module, parse_arg


def get_config(arg=None):
  dpo = config_module("dpo_tiny")
  a = parse_arg(arg, steps=150, sft="runs/sft_tiny", lr=1e-3, beta=0.1)
  return dpo.preference_config(a, dict(name="orpo", beta=a.beta))
