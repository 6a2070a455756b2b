"""LoRA fine-tuning of a local Hugging Face checkpoint (the configs/sft_hf.py template).

  ftjax train --config configs/lora_hf.py:path=/ckpt/Llama-3.2-1B-Instruct --workdir runs/lora
  ftjax export --workdir runs/lora --out runs/lora/adapter --adapter   # PeftModel.from_pretrained
  ftjax export --workdir runs/lora --out runs/lora/merged             # merged HF model

r 16, alpha 32 on every linear layer, lr 2e-4 (the usual LoRA range for pretrained models).
"""

from ftjax.config import parse_arg
from ftjax.peft.configs import derive


def get_config(arg=None):
  a = parse_arg(arg, path="", steps=1000, r=16)
  return derive(f"sft_hf:path={a.path},steps={a.steps}", "lora", lr=2e-4, r=a.r,
                alpha=2.0 * a.r)
