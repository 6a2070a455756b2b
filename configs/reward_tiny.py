"""Bradley-Terry reward model on the arithmetic pairs: the SFT decoder + a scalar head.

  ftjax train --config configs/reward_tiny.py:sft=runs/sft_tiny --workdir runs/reward_tiny
  ftjax export --workdir runs/reward_tiny --out runs/reward_tiny/hf   # AutoModelForSequenceClassification

The head (`score`, HF AutoModelForSequenceClassification layout, num_labels=1) reads the last
real token. Eval: held-out pair accuracy.
"""

from ftjax.config import config_module, parse_arg


def get_config(arg=None):
  dpo = config_module("dpo_tiny")
  a = parse_arg(arg, steps=150, sft="runs/sft_tiny", lr=1e-3)
  c = dpo.preference_config(a, dict(name="reward", center_rewards_coefficient=0.0,
                                    use_margin=True))
  c.model.head = "reward"
  c.eval.exact_match_examples = 0  # a reward model does not generate
  return c
