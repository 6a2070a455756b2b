"""Sparse upcycling (Komatsuzaki et al. 2022): a dense model -> an E-expert MoE.

Every expert starts as a copy of the layer's dense MLP and the router is fresh (normal, std
`router_std`). With renormalised top-k softmax weights (they sum to 1) and identical experts,
sum_j w_j * MLP(x) = MLP(x), so the upcycled model's logits equal the dense model's at
initialisation; training then differentiates the experts. `norm_topk_prob=False` would scale
the MLP output by the (random) top-k mass, so upcycling always routes with renormalisation.

    moe_params, moe_cfg = upcycle_params(params, cfg, num_experts=8, top_k=2)
    upcycle_checkpoint("runs/sft_tiny", "runs/moe_hf", num_experts=8, top_k=2)   # or an HF dir
  CLI: ftjax upcycle --src DIR --out HF_DIR --num_experts 8 --top_k 2
"""

from __future__ import annotations

import json
import os
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.models import moe
from ftjax.models.config import ModelConfig

# Dense family -> the HF MoE family that can hold the upcycled model (for export).
MOE_FAMILY = {"llama": "mixtral", "mistral": "mixtral", "qwen3": "qwen3_moe"}


def upcycle_config(cfg: ModelConfig, num_experts: int, top_k: int, **moe_kw) -> ModelConfig:
  """The MoE config: same architecture, MLP -> num_experts copies of it, top_k routing."""
  if cfg.num_experts:
    raise ValueError(f"upcycle: the source model is already an MoE (num_experts={cfg.num_experts})")
  if not cfg.mlp_gated or cfg.mlp_bias:
    raise ValueError("upcycle: needs a gated MLP without bias (SwiGLU experts); "
                     f"got mlp_gated={cfg.mlp_gated}, mlp_bias={cfg.mlp_bias}")
  if num_experts < 1 or not 1 <= top_k <= num_experts:
    raise ValueError(f"upcycle: need 1 <= top_k ({top_k}) <= num_experts ({num_experts})")
  router = moe_kw.pop("moe_router", "softmax_topk")
  if router not in ("softmax_topk", "topk_softmax"):
    raise ValueError(f"upcycle: moe_router={router!r} does not preserve the dense output "
                     "(use softmax_topk or topk_softmax)")
  family = MOE_FAMILY.get(cfg.family, cfg.family)
  if family == "mixtral" and (cfg.qkv_bias or cfg.o_bias):
    family = cfg.family  # Mixtral has no attention biases: keep the dense family name
  out = cfg.replace(family=family, num_experts=num_experts, num_experts_per_tok=top_k,
                    moe_intermediate_size=cfg.intermediate_size, moe_router=router,
                    moe_norm_topk_prob=True, moe_shared_intermediate_size=0, **moe_kw)
  moe.validate_config(out)
  return out


def upcycle_params(params, cfg: ModelConfig, num_experts: int, top_k: int, *, seed: int = 0,
                   router_std: float = 0.02, **moe_kw) -> Tuple[Any, ModelConfig]:
  """Dense params (raw or boxed) of `Decoder(cfg)` -> (MoE params, MoE config).

  layers/mlp/{gate,up,down}_proj/kernel [L, D, F] / [L, F, D] become
  layers/mlp/experts/{gate,up,down}_proj/kernel [L, E, D, F] / [L, E, F, D] and a router
  layers/mlp/gate/kernel [L, D, E] ~ N(0, router_std) is added. Other params are shared.
  """
  moe_cfg = upcycle_config(cfg, num_experts, top_k, **moe_kw)
  params = nn.unbox(params)
  mlp = params["layers"]["mlp"]
  try:
    dense = {p: mlp[p]["kernel"] for p in ("gate_proj", "up_proj", "down_proj")}
  except KeyError as e:
    raise ValueError(f"upcycle: params lack layers/mlp/{e.args[0]} (not a dense SwiGLU model, "
                     "or unmerged adapters)") from e
  stack = lambda w: jnp.broadcast_to(w[:, None], (w.shape[0], num_experts) + w.shape[1:])
  num_layers, d = dense["gate_proj"].shape[:2]
  router = router_std * jax.random.normal(jax.random.key(seed), (num_layers, d, num_experts),
                                          jnp.float32)
  new_mlp = {"gate": {"kernel": router.astype(dense["gate_proj"].dtype)},
             "experts": {p: {"kernel": stack(w)} for p, w in dense.items()}}
  layers = dict(params["layers"], mlp=new_mlp)
  return dict(params, layers=layers), moe_cfg


def _is_hf_dir(path: str) -> bool:
  cfg = os.path.join(path, "config.json")
  if not os.path.isfile(cfg):
    return False
  with open(cfg) as f:
    return "model_type" in json.load(f)


def upcycle_checkpoint(src: str, out_dir: str, num_experts: int = 8, top_k: int = 2,
                       seed: int = 0, **moe_kw) -> str:
  """A dense HF dir or ftjax training workdir -> an upcycled HF dir (e.g. Mixtral) at out_dir.

  The output loads with `ftjax.models.hf.load_hf` (config.model.hf_path) and, for families with
  an HF MoE counterpart (Llama/Mistral -> Mixtral, Qwen3 -> Qwen3-MoE), with transformers.
  """
  from ftjax.models import hf  # pylint: disable=g-import-not-at-top
  src = os.fspath(src)
  if _is_hf_dir(src):
    cfg, params = hf.load_hf(src)
    tokenizer, base = src, src
  elif os.path.isdir(os.path.join(src, "checkpoints")):
    from ftjax import export  # pylint: disable=g-import-not-at-top
    config, cfg, params, tokenizer = export.load_run(src)
    base = None
    if config.peft.get("method", "none") not in ("none", "", None, "hft"):
      from ftjax import peft  # pylint: disable=g-import-not-at-top
      params, cfg = peft.merge(params, cfg)
  else:
    raise FileNotFoundError(f"--src {src}: neither an HF model dir (config.json with model_type) "
                            "nor a training workdir (checkpoints/)")
  moe_params, moe_cfg = upcycle_params(params, cfg, num_experts, top_k, seed=seed, **moe_kw)
  hf.export_hf(moe_params, moe_cfg, out_dir, tokenizer=tokenizer, base_config=base)
  return out_dir
