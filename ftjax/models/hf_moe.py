"""Mixtral, Qwen2-MoE and Qwen3-MoE: HF config mapping and tensor tables (see `hf.py`).

Expert weights are read in either layout and always written in the transformers v5 one:
  v5 (fused):      mlp.experts.gate_up_proj [E, 2F, D], mlp.experts.down_proj [E, D, F]
  v4 (per expert): block_sparse_moe.experts.{e}.w1/w3/w2.weight (Mixtral),
                   mlp.experts.{e}.gate_proj/up_proj/down_proj.weight (Qwen2/3-MoE)
The layout is picked from the checkpoint's tensor names. Every layer must be an MoE layer
(layers are scanned): `decoder_sparse_step` != 1 or `mlp_only_layers` are refused.
"""

# The dense families' helpers in hf_config / hf_weights are reused on purpose.
# pylint: disable=protected-access

from __future__ import annotations

import re
from typing import Any, Dict

from ftjax.models import hf_config as hc
from ftjax.models import hf_weights as hw
from ftjax.models.config import ModelConfig

_EXPERT_IDX = re.compile(r"\.experts\.(\d+)\.")
# v4 per-expert tensor names: (our name, Mixtral name, Qwen name)
_V4 = (("gate_proj", "w1", "gate_proj"), ("up_proj", "w3", "up_proj"),
       ("down_proj", "w2", "down_proj"))


def _check_all_sparse(d: Dict[str, Any]):
  if d.get("decoder_sparse_step", 1) != 1 or d.get("mlp_only_layers"):
    raise ValueError(
        f"config.json: decoder_sparse_step={d.get('decoder_sparse_step')} / mlp_only_layers="
        f"{d.get('mlp_only_layers')}: ftjax needs every layer to be an MoE layer")


def _moe_kw(d, num_experts_key: str, norm_default: bool, shared: int = 0):
  _check_all_sparse(d)
  # v5 Qwen-MoE configs may spell num_experts as num_local_experts (its attribute_map).
  e = d.get(num_experts_key, d.get("num_local_experts", d.get("num_experts")))
  if e is None:
    raise ValueError(f"config.json lacks required field {num_experts_key!r}")
  return dict(num_experts=int(e), num_experts_per_tok=int(d["num_experts_per_tok"]),
              moe_router="softmax_topk",
              moe_norm_topk_prob=bool(d.get("norm_topk_prob", norm_default)),
              moe_shared_intermediate_size=int(shared))


def _check_moe_export(cfg: ModelConfig, family: str, shared_ok: bool):
  if not cfg.num_experts:
    raise ValueError(f"model.num_experts=0 cannot be exported as HF {family}")
  if cfg.moe_router != "softmax_topk":
    raise ValueError(f"model.moe_router={cfg.moe_router!r} cannot be exported as HF {family} "
                     "(softmax_topk only)")
  if cfg.moe_shared_intermediate_size and not shared_ok:
    raise ValueError(f"model.moe_shared_intermediate_size cannot be exported as HF {family}")


def _moe_hf(cfg: ModelConfig) -> Dict[str, Any]:
  return dict(num_experts_per_tok=cfg.num_experts_per_tok, decoder_sparse_step=1,
              mlp_only_layers=[], output_router_logits=False)


# ----------------------------------------------------------------------------- configs


def _mixtral_to_cfg(d):
  kw = hc._llama_like(d)
  kw.update(_moe_kw(d, "num_local_experts", True), moe_intermediate_size=d["intermediate_size"])
  if not kw["moe_norm_topk_prob"]:
    raise ValueError("config.json: Mixtral always renormalises top-k weights")
  return kw


def _mixtral_to_hf(cfg: ModelConfig):
  hc._check_no_extras(cfg, {"num_experts"}, "mixtral")
  _check_moe_export(cfg, "mixtral", shared_ok=False)
  if not cfg.moe_norm_topk_prob:
    raise ValueError("model.moe_norm_topk_prob=False cannot be exported as HF mixtral")
  if cfg.sliding_window is not None and cfg.sliding_window_pattern != 1:
    raise ValueError("model.sliding_window_pattern must be 1 for HF mixtral")
  d = hc._llama_like_to_hf(cfg)
  d.update(_moe_hf(cfg), intermediate_size=cfg.moe_intermediate_size or cfg.intermediate_size,
           num_local_experts=cfg.num_experts, sliding_window=cfg.sliding_window)
  return d


def _qwen2_moe_to_cfg(d):
  kw = hc._llama_like(d, qkv_bias=bool(d.get("qkv_bias", True)))
  kw.update(_moe_kw(d, "num_experts", False, d.get("shared_expert_intermediate_size", 0)),
            moe_intermediate_size=d["moe_intermediate_size"])
  return kw


def _qwen3_moe_to_cfg(d):
  bias = bool(d.get("attention_bias", False))
  kw = hc._llama_like(d, qkv_bias=bias, o_bias=bias, qk_norm=True)
  kw.update(_moe_kw(d, "num_experts", False), moe_intermediate_size=d["moe_intermediate_size"])
  return kw


def _qwen_moe_hf(cfg: ModelConfig) -> Dict[str, Any]:
  d = hc._llama_like_to_hf(cfg)
  d.update(_moe_hf(cfg))
  d.update(hc._qwen_sliding(cfg))
  d.update(num_experts=cfg.num_experts, norm_topk_prob=cfg.moe_norm_topk_prob,
           moe_intermediate_size=cfg.moe_intermediate_size or cfg.intermediate_size)
  return d


def _qwen2_moe_to_hf(cfg: ModelConfig):
  hc._check_no_extras(cfg, {"num_experts", "qkv_bias"}, "qwen2_moe")
  _check_moe_export(cfg, "qwen2_moe", shared_ok=True)
  return dict(_qwen_moe_hf(cfg), qkv_bias=cfg.qkv_bias,
              shared_expert_intermediate_size=cfg.moe_shared_intermediate_size)


def _qwen3_moe_to_hf(cfg: ModelConfig):
  hc._check_no_extras(cfg, {"num_experts", "qkv_bias", "o_bias", "qk_norm"}, "qwen3_moe")
  _check_moe_export(cfg, "qwen3_moe", shared_ok=False)
  if cfg.qkv_bias != cfg.o_bias:
    raise ValueError("model.qkv_bias != model.o_bias cannot be exported as HF qwen3_moe")
  return dict(_qwen_moe_hf(cfg), attention_bias=cfg.qkv_bias)


# ----------------------------------------------------------------------------- tensor tables


def _check_expert_count(cfg: ModelConfig, names, fused_name: str):
  """An MoE checkpoint whose expert count disagrees with its config.json is an error."""
  found = None
  if fused_name in names:
    found = names[fused_name].shape[0] if hasattr(names[fused_name], "shape") else None
  else:
    idx = [int(m.group(1)) for n in names if (m := _EXPERT_IDX.search(n))]
    found = max(idx) + 1 if idx else None
  if found is not None and found != cfg.num_experts:
    raise ValueError(f"checkpoint has {found} experts per layer but config.json says "
                     f"{cfg.num_experts} (tensor {fused_name!r} or its per-expert form)")


def moe_table(cfg: ModelConfig, names=None):
  """llama_table (attention, norms, embeddings) + router, experts and the shared expert."""
  rules, ignore = hw.llama_table(cfg)
  mlp = ("layers", "mlp")
  mixtral = cfg.family == "mixtral"
  per_expert = names is not None and any(_EXPERT_IDX.search(n) for n in names)
  if names is not None:
    _check_expert_count(cfg, names, "model.layers.0.mlp.experts.gate_up_proj")
  if per_expert:  # transformers v4 layout
    block = "block_sparse_moe" if mixtral else "mlp"
    rules.append(hw.Rule(f"model.layers.{{i}}.{block}.gate.weight", (mlp + ("gate", "kernel"),),
                         "linear"))
    for ours, mx, qw in _V4:
      rules.append(hw.Rule(f"model.layers.{{i}}.{block}.experts.{{e}}.{mx if mixtral else qw}"
                           ".weight", (mlp + ("experts", ours, "kernel"),), "linear"))
  else:  # transformers v5: experts fused and stacked per layer
    rules += [
        hw.Rule("model.layers.{i}.mlp.gate.weight", (mlp + ("gate", "kernel"),), "linear"),
        hw.Rule("model.layers.{i}.mlp.experts.gate_up_proj",
                (mlp + ("experts", "gate_proj", "kernel"), mlp + ("experts", "up_proj", "kernel")),
                "expert_linear"),
        hw.Rule("model.layers.{i}.mlp.experts.down_proj",
                (mlp + ("experts", "down_proj", "kernel"),), "expert_linear"),
    ]
  if cfg.moe_shared_intermediate_size:
    for p in ("gate_proj", "up_proj", "down_proj"):
      rules += hw._lin(f"model.layers.{{i}}.mlp.shared_expert.{p}",
                       mlp + ("shared_expert", p), False)
    rules += hw._lin("model.layers.{i}.mlp.shared_expert_gate",
                     mlp + ("shared_expert_gate",), False)
  return rules, ignore


moe_table.reads_names = True

for _fam in (
    hc.Family("mixtral", "MixtralForCausalLM", _mixtral_to_cfg, _mixtral_to_hf),
    hc.Family("qwen2_moe", "Qwen2MoeForCausalLM", _qwen2_moe_to_cfg, _qwen2_moe_to_hf),
    hc.Family("qwen3_moe", "Qwen3MoeForCausalLM", _qwen3_moe_to_cfg, _qwen3_moe_to_hf),
):
  hc.register_family(_fam)
  hw.register_table(_fam.model_type, moe_table)
