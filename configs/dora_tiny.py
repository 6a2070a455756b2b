"""DoRA variant of the shipped SFT run: LoRA r 8 plus a trained magnitude per output feature.

  ftjax train --config configs/dora_tiny.py --workdir runs/dora_tiny
  ftjax export --workdir runs/dora_tiny --out runs/dora_tiny/adapter --adapter  # PEFT use_dora

The magnitude starts at the weight's norm over the input dim, so step 0 equals the base model.
"""

from ftjax.config import parse_arg
from ftjax.peft.configs import derive


def get_config(arg=None):
  a = parse_arg(arg, steps=600, init="", r=8)
  return derive(f"sft_tiny:steps={a.steps}", "dora", lr=3e-3, init=a.init, r=a.r,
                alpha=2.0 * a.r)
