"""QLoRA of a local Hugging Face checkpoint: NF4 base (block 64, double quant) + LoRA r 16.

  ftjax train --config configs/qlora_hf.py:path=/ckpt/Llama-3.1-8B-Instruct --workdir runs/qlora

The base kernels take ~0.52 bytes per weight (12.9% of fp32); embeddings, norms and the LM head
stay in config.model.param_dtype (bfloat16 here). Every linear input dim must be a multiple of
block_size (true for Llama/Qwen/Mistral/Gemma sizes).
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
  c = _lora_helpers().derive("sft_hf", f"path={a.path},steps={a.steps}", "qlora", lr=2e-4,
                             r=a.r, alpha=2.0 * a.r, double_quant=True)
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  return c
