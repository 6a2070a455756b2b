r"""LoRA variant of the shipped SFT run (configs/sft_tiny.py): r 8, alpha 16, every linear layer.

  ftjax train --config configs/lora_tiny.py --workdir runs/lora_tiny
  ftjax train --config configs/lora_tiny.py:init=runs/sft_tiny --workdir runs/lora_tiny
  ftjax export --workdir runs/lora_tiny --out runs/lora_tiny/adapter --adapter   # PEFT format

Only the adapters train (~9% of the tiny model's weights at r 8) and get optimizer state; the base
is frozen. LoRA is meant for a pretrained base: `init=DIR` starts from another run's checkpoint
(e.g. the SFT run); from random weights it still learns, but slower than full fine-tuning.
Variants: --config.peft.r=16 --config.peft.use_rslora=True
--config.peft.target_modules='("q_proj","v_proj")' (a list; a plain string is a regex, e.g.
'.*self_attn\.(q|v)_proj') --config.peft.modules_to_save='("lm_head",)' (trained in full)
--config.peft.dropout=0.05.
The same `ftjax.peft.configs.derive` builds the dora_*, qlora_* and hft_* configs.
"""

from ftjax.config import parse_arg
from ftjax.peft.configs import derive


def get_config(arg=None):
  a = parse_arg(arg, steps=600, init="", r=8)
  return derive(f"sft_tiny:steps={a.steps}", "lora", lr=3e-3, init=a.init, r=a.r,
                alpha=2.0 * a.r)
