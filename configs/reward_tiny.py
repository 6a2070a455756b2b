"""Bradley-Terry reward model on the arithmetic pairs: the SFT decoder + a scalar head.

  ftjax train --config configs/reward_tiny.py:sft=runs/sft_tiny --workdir runs/reward_tiny
  ftjax export --workdir runs/reward_tiny --out runs/reward_tiny/hf   # AutoModelForSequenceClassification
  ftjax train --config configs/reward_tiny.py:sft=runs/sft_tiny,peft=lora,lr=3e-3 \
      --workdir runs/reward_lora --config.peft.target_modules='("q_proj","v_proj")'
  ftjax export --workdir runs/reward_lora --out runs/reward_lora/adapter --adapter  # PEFT SEQ_CLS

The head (`score`, HF AutoModelForSequenceClassification layout, num_labels=1) reads the last
real token. Eval: held-out pair accuracy. With `peft=lora|dora|qlora` the score head trains in
full next to the adapters (PEFT's SEQ_CLS modules_to_save) and `all-linear` leaves it out.
"""

from ftjax.config import config_module, parse_arg
from ftjax.peft.configs import default_config


def get_config(arg=None):
  dpo = config_module("dpo_tiny")
  a = parse_arg(arg, steps=150, sft="runs/sft_tiny", lr=1e-3, peft="")
  c = dpo.preference_config(a, dict(name="reward", center_rewards_coefficient=0.0,
                                    use_margin=True))
  c.model.head = "reward"
  c.eval.exact_match_examples = 0  # a reward model does not generate
  if a.peft:
    c.peft = default_config(a.peft, block_size=32)  # NF4 blocks must divide the MLP width 352
  return c
