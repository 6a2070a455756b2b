"""Bradley-Terry reward model on the arithmetic pairs: the SFT decoder + a scalar head.

  ftjax train --config configs/reward_tiny.py:sft=runs/sft_tiny --workdir runs/reward_tiny

The head (`score`, HF AutoModelForSequenceClassification layout, num_labels=1) reads the last
real token; export with ftjax.models.reward.export_reward_hf. Eval: held-out pair accuracy.
"""

import importlib.util
import os

from ftjax.config import parse_arg


def get_config(arg=None):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dpo_tiny.py")
  spec = importlib.util.spec_from_file_location("ftjax_configs_dpo_tiny", path)
  dpo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(dpo)
  a = parse_arg(arg, steps=150, sft="runs/sft_tiny", lr=1e-3)
  c = dpo.preference_config(a, dict(name="reward", center_rewards_coefficient=0.0,
                                    use_margin=True))
  c.model.head = "reward"
  c.eval.exact_match_examples = 0  # a reward model does not generate
  return c
