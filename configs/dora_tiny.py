"""DoRA variant of the shipped SFT run: LoRA r 8 plus a trained magnitude per output feature.

  ftjax train --config configs/dora_tiny.py --workdir runs/dora_tiny
  ftjax export --workdir runs/dora_tiny --out runs/dora_tiny/adapter --adapter  # PEFT use_dora

The magnitude starts at the weight's norm over the input dim, so step 0 equals the base model.
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
  a = parse_arg(arg, steps=600, init="", r=8)
  return _lora_helpers().derive("sft_tiny", f"steps={a.steps}", "dora", lr=3e-3, init=a.init,
                                r=a.r, alpha=2.0 * a.r)
