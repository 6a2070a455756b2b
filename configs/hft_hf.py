"""Half Fine-Tuning of a local Hugging Face checkpoint (the configs/sft_hf.py template).

  ftjax train --config configs/hft_hf.py:path=/ckpt/Qwen2.5-0.5B-Instruct --workdir runs/hft
"""

from ftjax.config import parse_arg
from ftjax.peft.configs import derive


def get_config(arg=None):
  a = parse_arg(arg, path="", steps=1000, round_len=100)
  return derive(f"sft_hf:path={a.path},steps={a.steps}", "hft", round_len=a.round_len)
