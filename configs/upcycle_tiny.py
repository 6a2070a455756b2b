"""Continue training an upcycled MoE: the shipped tiny model -> 8 experts (top-2) -> SFT.

  ftjax train   --config configs/sft_tiny.py --workdir runs/sft_tiny          # dense (default)
  ftjax upcycle --src runs/sft_tiny --out runs/sft_tiny_moe8 --num_experts 8 --top_k 2
  ftjax train   --config configs/upcycle_tiny.py:src=runs/sft_tiny_moe8 --workdir runs/upcycled

The upcycled model starts with exactly the dense model's logits (every expert is a copy of the
dense MLP, renormalised top-2 weights sum to 1), so the first loss equals the dense run's last
loss; training then adds the router terms (moe_aux_coef, moe_z_coef) and specialises experts.
"""

from ftjax.config import load_config, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, src="runs/sft_tiny_moe8", steps=200, aux=0.01, z=0.001)
  c = load_config(f"sft_tiny:steps={a.steps}")  # same data and eval as the dense run
  c.model.hf_path = a.src  # architecture (Mixtral) + upcycled weights; size fields are ignored
  c.data.tokenizer = a.src  # `ftjax upcycle` copies the tokenizer next to the weights
  c.objective.moe_aux_coef = a.aux
  c.objective.moe_z_coef = a.z
  c.optim.update(dict(lr=1e-3, warmup_steps=10))
  c.eval.every = max(a.steps // 2, 1)
  c.checkpoint.update(dict(every=0, keep=1))
  return c
