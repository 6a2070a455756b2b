"""QLoRA variant of the shipped SFT run: NF4 base weights (4-bit, blockwise absmax) + LoRA r 8.

  ftjax train --config configs/qlora_tiny.py --workdir runs/qlora_tiny

The tiny model's MLP width (352) is not a multiple of 64, so this config uses NF4 blocks of 32
(block_size must divide every linear layer's input dim). The base kernels are quantised once at
init and dequantised on the fly in every matmul; `ftjax export` merges into full precision.
"""

from ftjax.config import parse_arg
from ftjax.peft.configs import derive


def get_config(arg=None):
  a = parse_arg(arg, steps=600, init="", r=8, double_quant=False)
  return derive(f"sft_tiny:steps={a.steps}", "qlora", lr=3e-3, init=a.init, r=a.r,
                alpha=2.0 * a.r, block_size=32, double_quant=a.double_quant)
