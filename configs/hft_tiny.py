"""Half Fine-Tuning variant of the shipped SFT run: full fine-tuning, but every `round_len` steps
a new seeded half of each layer's attention and MLP matrices is frozen (ftjax/peft/hft.py).

  ftjax train --config configs/hft_tiny.py --workdir runs/hft_tiny
"""

from ftjax.config import parse_arg
from ftjax.peft.configs import derive


def get_config(arg=None):
  a = parse_arg(arg, steps=600, init="", round_len=100)
  return derive(f"sft_tiny:steps={a.steps}", "hft", init=a.init, round_len=a.round_len)
