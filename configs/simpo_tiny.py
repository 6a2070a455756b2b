"""SimPO (reference-free, length-averaged log-probs, target margin gamma) on the arithmetic pairs.

  ftjax train --config configs/simpo_tiny.py:sft=runs/sft_tiny --workdir runs/simpo_tiny

TRL's CPOTrainer(loss_type='simpo') defaults: beta 2.0 here as in the SimPO paper, gamma 0.5
(simpo_gamma is the margin itself; the loss uses gamma/beta), cpo_alpha 0 (set > 0 for CPO-SimPO).
"""

import importlib.util
import os

from ftjax.config import parse_arg


def get_config(arg=None):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dpo_tiny.py")
  spec = importlib.util.spec_from_file_location("ftjax_configs_dpo_tiny", path)
  dpo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(dpo)
  a = parse_arg(arg, steps=150, sft="runs/sft_tiny", lr=2e-4, beta=2.0, gamma=0.5)
  return dpo.preference_config(a, dict(name="simpo", beta=a.beta, simpo_gamma=a.gamma,
                                       cpo_alpha=0.0, label_smoothing=0.0))
