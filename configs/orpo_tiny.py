"""ORPO (odds-ratio term + NLL on the chosen sequence, no reference) on the arithmetic pairs.

  ftjax train --config configs/orpo_tiny.py:sft=runs/sft_tiny --workdir runs/orpo_tiny

ORPO is meant to replace SFT: `sft=` may be '' to start from random weights.
"""

import importlib.util
import os

from ftjax.config import parse_arg


def get_config(arg=None):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dpo_tiny.py")
  spec = importlib.util.spec_from_file_location("ftjax_configs_dpo_tiny", path)
  dpo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(dpo)
  a = parse_arg(arg, steps=150, sft="runs/sft_tiny", lr=1e-3, beta=0.1)
  return dpo.preference_config(a, dict(name="orpo", beta=a.beta))
