"""DoRA fine-tuning of a local Hugging Face checkpoint (the configs/sft_hf.py template).

  ftjax train --config configs/dora_hf.py:path=/ckpt/Qwen2.5-0.5B-Instruct --workdir runs/dora
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
  a = parse_arg(arg, path="", steps=1000, r=16)
  return _lora_helpers().derive("sft_hf", f"path={a.path},steps={a.steps}", "dora", lr=2e-4,
                                r=a.r, alpha=2.0 * a.r)
