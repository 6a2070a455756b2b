"""DoRA fine-tuning of a local Hugging Face checkpoint (the configs/sft_hf.py template).

  ftjax train --config configs/dora_hf.py:path=/ckpt/Qwen2.5-0.5B-Instruct --workdir runs/dora
"""

from ftjax.config import parse_arg
from ftjax.peft.configs import derive


def get_config(arg=None):
  a = parse_arg(arg, path="", steps=1000, r=16)
  return derive(f"sft_hf:path={a.path},steps={a.steps}", "dora", lr=2e-4, r=a.r,
                alpha=2.0 * a.r)
