"""LoRA variant of the shipped SFT run (configs/sft_tiny.py): r 8, alpha 16, every linear layer.

  ftjax train --config configs/lora_tiny.py --workdir runs/lora_tiny
  ftjax train --config configs/lora_tiny.py:init=runs/sft_tiny --workdir runs/lora_tiny
  ftjax export --workdir runs/lora_tiny --out runs/lora_tiny/adapter --adapter   # PEFT format

Only the adapters train (~9% of the tiny model's weights at r 8) and get optimizer state; the base
is frozen. LoRA is meant for a pretrained base: `init=DIR` starts from another run's checkpoint
(e.g. the SFT run); from random weights it still learns, but slower than full fine-tuning.
Variants: --config.peft.r=16 --config.peft.use_rslora=True
--config.peft.target_modules='("q_proj","v_proj")' --config.peft.dropout=0.05.
The same helpers build dora_*, qlora_* and hft_* configs (see `derive`).
"""

import importlib.util
import os

import ml_collections

from ftjax.config import parse_arg

_HERE = os.path.dirname(os.path.abspath(__file__))


def load_config(name: str, arg=None):
  """get_config(arg) of configs/<name>.py (configs/ is not a package, so load it by path)."""
  spec = importlib.util.spec_from_file_location(f"ftjax_configs_{name}",
                                                os.path.join(_HERE, f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def peft_section(method: str, **overrides) -> ml_collections.ConfigDict:
  """config.peft with every key present (so --config.peft.X flags work on a locked config)."""
  p = dict(method=method, r=8, alpha=16.0, dropout=0.0, target_modules="all-linear",
           rank_pattern={}, alpha_pattern={}, use_rslora=False, use_dora=method == "dora",
           quantize="nf4" if method == "qlora" else "", block_size=64, double_quant=False,
           round_len=100, seed=0)
  p.update(overrides)
  return ml_collections.ConfigDict(p)


def derive(base: str, base_arg, method: str, lr: float, init: str = "", **peft_kw):
  """configs/<base>.py's config with config.peft set; PEFT wants a larger lr than full FT."""
  c = load_config(base, base_arg)
  c.peft = peft_section(method, **peft_kw)
  c.optim.lr = lr
  c.optim.weight_decay = 0.0
  if init:
    c.init_from = init
  return c


def get_config(arg=None):
  a = parse_arg(arg, steps=600, init="", r=8)
  return derive("sft_tiny", f"steps={a.steps}", "lora", lr=3e-3, init=a.init, r=a.r,
                alpha=2.0 * a.r)
