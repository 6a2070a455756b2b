"""QLoRA of a local Hugging Face checkpoint: NF4 base (block 64, double quant) + LoRA r 16.

  ftjax train --config configs/qlora_hf.py:path=/ckpt/Llama-3.1-8B-Instruct --workdir runs/qlora

The base kernels take ~0.52 bytes per weight (12.9% of fp32); embeddings, norms and the LM head
stay in config.model.param_dtype (bfloat16 here). Every linear input dim must be a multiple of
block_size (true for Llama/Qwen/Mistral/Gemma sizes).
"""

from ftjax.config import parse_arg
from ftjax.peft.configs import derive


def get_config(arg=None):
  a = parse_arg(arg, path="", steps=1000, r=16)
  c = derive(f"sft_hf:path={a.path},steps={a.steps}", "qlora", lr=2e-4, r=a.r,
             alpha=2.0 * a.r, double_quant=True)
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  return c
