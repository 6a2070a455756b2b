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

from ftjax.config import base_config, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, steps=600, aux=0.01, z=0.001, experts=8, top_k=2, dispatch="dropless",
                capacity_factor=1.25)
  c = base_config()
  c.model.update(dict(vocab_size=128, hidden_size=128, intermediate_size=352, num_layers=4,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=256, family="mixtral",
                      num_experts=a.experts, num_experts_per_tok=a.top_k,
                      moe_intermediate_size=352 // a.top_k, moe_dispatch=a.dispatch,
                      moe_capacity_factor=a.capacity_factor))
  c.objective.moe_aux_coef = a.aux
  c.objective.moe_z_coef = a.z
  c.data.packing = True
  c.train.update(dict(steps=a.steps, batch_size=32, seq_len=64, log_every=20))
  c.optim.update(dict(lr=3e-3, warmup_steps=30, schedule="cosine", weight_decay=0.01))
  c.eval.update(dict(every=max(a.steps // 3, 1), batches=4, batch_size=32,
                     exact_match_examples=200, max_new_tokens=5))
  c.checkpoint.update(dict(every=200, keep=2))
  return c
