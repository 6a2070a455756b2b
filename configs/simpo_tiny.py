"""SimPO (reference-free, length-averaged log-probs, target margin gamma) on the arithmetic pairs.

  ftjax train --config configs/simpo_tiny.py:sft=runs/sft_tiny --workdir runs/simpo_tiny

TRL's CPOTrainer(loss_type='simpo') defaults: beta 2.0 here as in the SimPO paper, gamma 0.5
(simpo_gamma is the margin itself; the loss uses gamma/beta), cpo_alpha 0 (set > 0 for CPO-SimPO).
"""

from ftjax.config import config_module, parse_arg


def get_config(arg=None):
  dpo = config_module("dpo_tiny")
  a = parse_arg(arg, steps=150, sft="runs/sft_tiny", lr=2e-4, beta=2.0, gamma=0.5)
  return dpo.preference_config(a, dict(name="simpo", beta=a.beta, simpo_gamma=a.gamma,
                                       cpo_alpha=0.0, label_smoothing=0.0))
