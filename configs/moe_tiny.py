"""SFT of a tiny Mixtral-style MoE (8 experts, top-2) from scratch on the shipped addition task.

  ftjax train --config configs/moe_tiny.py --workdir runs/moe_tiny
  ftjax export --workdir runs/moe_tiny --out runs/moe_tiny/hf   # HF Mixtral dir

Same data, width and schedule as configs/sft_tiny.py. Each expert is a SwiGLU of width 176, so
the 2 active experts match the dense model's 352-wide MLP in FLOPs (8x its MLP parameters).
Router terms: loss += moe_aux_coef * load-balancing (Switch/Mixtral form, >= top_k, = top_k when
perfectly balanced) + moe_z_coef * router z-loss. Metrics: moe_lb_loss, moe_z_loss,
moe_dropped_frac, moe_max_load/layerL (max expert share x E; 1 = balanced),
moe_load/layerL_expertE. Variants on the arg:
  --config configs/moe_tiny.py:steps=100,aux=0,dispatch=capacity,capacity_factor=1.25
"""

from ftjax.config import load_config, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, steps=600, aux=0.01, z=0.001, experts=8, top_k=2, dispatch="dropless",
                capacity_factor=1.25)
  c = load_config(f"sft_tiny:steps={a.steps}")  # same data, width, schedule and eval
  c.model.update(dict(family="mixtral", num_experts=a.experts, num_experts_per_tok=a.top_k,
                      moe_intermediate_size=c.model.intermediate_size // a.top_k,
                      moe_dispatch=a.dispatch, moe_capacity_factor=a.capacity_factor))
  c.objective.moe_aux_coef = a.aux
  c.objective.moe_z_coef = a.z
  return c
