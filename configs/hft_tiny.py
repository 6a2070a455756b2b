"""Half Fine-Tuning variant of the shipped SFT run: full fine-tuning, but every `round_len` steps
a new seeded half of each layer's attention and MLP matrices is frozen (ftjax/peft/hft.py).

  ftjax train --config configs/hft_tiny.py --workdir runs/hft_tiny
"""

import importlib.util
import os

from ftjax.config import parse_arg


def _lora_helpers():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lora_tiny.py")
  spec = importlib.util.spec_from_file_location("ftjax_configs_lora_tiny", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def get_config(arg=None):
  a = parse_arg(arg, steps=600, init="", round_len=100)
  base = _lora_helpers().load_config("sft_tiny", f"steps={a.steps}")
  c = _lora_helpers().derive("sft_tiny", f"steps={a.steps}", "hft", lr=base.optim.lr,
                             init=a.init, round_len=a.round_len)
  c.optim.weight_decay = base.optim.weight_decay
  return c
