"""Hugging Face `config.json` <-> `ModelConfig`, for transformers v4 and v5 spellings.

Each family is a pair of functions in `FAMILIES` (model_type -> `Family`): `to_cfg(d)` reads an
HF config dict into `ModelConfig` keyword arguments, `to_hf(cfg)` writes it back. Adding a family
(e.g. Mixtral in `hf_moe.py`) = `register_family(Family(...))` plus a key table in
`hf_weights.py`; nothing else changes.

Spellings read: v5 `rope_parameters` (holding rope_theta) and v4 `rope_theta` + `rope_scaling`
(whose kind is `rope_type` or the older `type`); GPT-2's n_embd / n_layer / n_head / n_positions.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Dict, Optional

from ftjax.models.config import ModelConfig

_ROPE_KINDS = ("default", "linear", "dynamic", "llama3")
_ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_tanh", "relu")


@dataclasses.dataclass(frozen=True)
class Family:
  model_type: str
  architecture: str  # what `architectures` says on export
  to_cfg: Callable[[Dict[str, Any]], Dict[str, Any]]  # HF dict -> ModelConfig kwargs
  to_hf: Callable[[ModelConfig], Dict[str, Any]]  # ModelConfig -> HF dict (no model_type)


FAMILIES: Dict[str, Family] = {}


def register_family(family: Family) -> Family:
  FAMILIES[family.model_type] = family
  return family


def read_hf_config(path_or_dict) -> Dict[str, Any]:
  """The config.json of an HF dir (or the file itself, or an already-parsed dict)."""
  if isinstance(path_or_dict, dict):
    return dict(path_or_dict)
  path = os.fspath(path_or_dict)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such HF config (expected a dir with config.json)")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e


def config_from_hf(path_or_dict) -> ModelConfig:
  """ModelConfig for a local HF dir, a config.json path, or a config dict."""
  d = read_hf_config(path_or_dict)
  where = path_or_dict if not isinstance(path_or_dict, dict) else "config"
  mt = d.get("model_type")
  if mt not in FAMILIES:
    raise ValueError(f"{where}: unsupported model_type {mt!r} "
                     f"(supported: {', '.join(sorted(FAMILIES))})")
  try:
    return ModelConfig(family=mt, **FAMILIES[mt].to_cfg(d))
  except KeyError as e:
    raise ValueError(f"{where}: config.json lacks required field {e.args[0]!r}") from e


def config_to_hf(cfg: ModelConfig) -> Dict[str, Any]:
  """HF config dict (v5 spelling, plus v4 rope keys so both versions read it)."""
  if cfg.family not in FAMILIES:
    raise ValueError(f"model.family={cfg.family!r}: no HF export (supported: "
                     f"{', '.join(sorted(FAMILIES))})")
  fam = FAMILIES[cfg.family]
  d = {"model_type": fam.model_type, "architectures": [fam.architecture]}
  d.update(fam.to_hf(cfg))
  d["dtype"] = cfg.param_dtype
  d["torch_dtype"] = cfg.param_dtype
  return d


# ----------------------------------------------------------------------------- RoPE


def rope_from_hf(d: Dict[str, Any]):
  """(rope_theta, hashable rope_scaling or None) from either spelling."""
  params = d.get("rope_scaling") or d.get("rope_parameters") or {}
  if any(isinstance(v, dict) for v in params.values()):
    raise ValueError("config.json: per-layer-type rope_parameters are not supported")
  theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
  if d.get("rope_parameters") and "rope_theta" in d["rope_parameters"]:
    theta = float(d["rope_parameters"]["rope_theta"])
  kind = params.get("rope_type", params.get("type", "default"))
  if kind not in _ROPE_KINDS:
    raise ValueError(f"config.json: rope type {kind!r} is not supported "
                     f"(supported: {', '.join(_ROPE_KINDS)})")
  prf = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
  if prf not in (None, 1, 1.0):
    raise ValueError(f"config.json: partial_rotary_factor={prf} is not supported")
  if kind == "default":
    return theta, None
  sc = {k: v for k, v in params.items()
        if k not in ("rope_theta", "type", "rope_type", "partial_rotary_factor")}
  sc["rope_type"] = kind
  if kind == "dynamic":  # HF scales against max_position_embeddings, whatever else is stored
    sc["original_max_position_embeddings"] = d["max_position_embeddings"]
  if kind == "llama3":
    sc.setdefault("original_max_position_embeddings", d["max_position_embeddings"])
  return theta, tuple(sorted(sc.items()))


def rope_to_hf(cfg: ModelConfig) -> Dict[str, Any]:
  sc = dict(cfg.rope_scaling or ())
  kind = sc.pop("rope_type", sc.pop("type", "default"))
  if kind == "dynamic":
    sc.pop("original_max_position_embeddings", None)
  params = {"rope_type": kind, "rope_theta": cfg.rope_theta, **sc}
  out = {"rope_parameters": params, "rope_theta": cfg.rope_theta}
  if kind != "default":
    out["rope_scaling"] = {"rope_type": kind, **sc}
  return out


# ----------------------------------------------------------------------------- families


def _activation(name: str) -> str:
  if name not in _ACTIVATIONS:
    raise ValueError(f"config.json: activation {name!r} is not supported "
                     f"(supported: {', '.join(_ACTIVATIONS)})")
  return name


def _sliding(d: Dict[str, Any], n_layers: int):
  """(sliding_window, sliding_window_pattern) from sliding_window + layer_types / use_*."""
  window = d.get("sliding_window")
  if d.get("use_sliding_window") is False:
    window = None
  types = d.get("layer_types")
  if window is None:
    return None, 1
  if not types:
    if "use_sliding_window" in d and "max_window_layers" in d:  # Qwen2 rule in transformers
      types = ["sliding_attention" if i >= d["max_window_layers"] else "full_attention"
               for i in range(n_layers)]
    else:
      return int(window), 1
  if all(t == "full_attention" for t in types):
    return None, 1
  if all(t == "sliding_attention" for t in types):
    return int(window), 1
  alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
  if list(types) == alternating:
    return int(window), 2
  raise ValueError(f"config.json: layer_types {types} are not supported (all sliding, all full, "
                   "or sliding on even layers)")


def _llama_like(d: Dict[str, Any], **switches) -> Dict[str, Any]:
  n_heads = d["num_attention_heads"]
  theta, scaling = rope_from_hf(d)
  window, pattern = _sliding(d, d["num_hidden_layers"])
  kw = dict(
      vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
      intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
      num_heads=n_heads, num_kv_heads=d.get("num_key_value_heads") or n_heads,
      head_dim=d.get("head_dim"), max_position_embeddings=d.get("max_position_embeddings", 2048),
      norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
      tie_embeddings=bool(d.get("tie_word_embeddings", False)),
      mlp_activation=_activation(d.get("hidden_act", "silu")),
      sliding_window=window, sliding_window_pattern=pattern)
  kw.update(switches)
  return kw


def _llama_to_cfg(d):
  bias = bool(d.get("attention_bias", False))
  return _llama_like(d, qkv_bias=bias, o_bias=bias, mlp_bias=bool(d.get("mlp_bias", False)))


def _mistral_to_cfg(d):
  return _llama_like(d)


def _qwen2_to_cfg(d):
  return _llama_like(d, qkv_bias=True)


def _qwen3_to_cfg(d):
  bias = bool(d.get("attention_bias", False))
  return _llama_like(d, qkv_bias=bias, o_bias=bias, qk_norm=True)


def _gemma_act(d):
  # v4 Gemma reads hidden_activation (default tanh GELU); v5 maps the legacy "gelu" to tanh too.
  act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
  return _activation("gelu_pytorch_tanh" if act == "gelu" else act)


def _gemma_to_cfg(d):
  bias = bool(d.get("attention_bias", False))
  d = {"tie_word_embeddings": True, **d}
  return _llama_like(d, qkv_bias=bias, o_bias=bias, norm_plus_one=True, embed_scale=True,
                     mlp_activation=_gemma_act(d))


def _gemma2_to_cfg(d):
  if d.get("sliding_window") is not None and not d.get("layer_types"):
    # v4 configs have no layer_types: Gemma 2 always slid on even layers.
    d = dict(d, layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                             for i in range(d["num_hidden_layers"])])
  kw = _gemma_to_cfg(d)
  # Missing keys take Gemma2Config's defaults (an explicit null turns a cap off).
  kw.update(post_norms=True, attn_logit_softcap=d.get("attn_logit_softcapping", 50.0),
            final_logit_softcap=d.get("final_logit_softcapping", 30.0),
            query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256))
  return kw


def _check_no_extras(cfg: ModelConfig, allowed: set, family: str):
  """Export refuses switches the target HF class cannot express (the logits would differ)."""
  defaults = ModelConfig()
  for f in ("qkv_bias", "o_bias", "mlp_bias", "qk_norm", "post_norms", "norm_plus_one",
            "embed_scale", "attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar",
            "num_experts"):
    if f not in allowed and getattr(cfg, f) != getattr(defaults, f):
      raise ValueError(f"model.{f}={getattr(cfg, f)!r} cannot be exported as HF {family}")


def _llama_like_to_hf(cfg: ModelConfig) -> Dict[str, Any]:
  d = dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.dim_per_head, max_position_embeddings=cfg.max_position_embeddings,
      rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
      hidden_act=cfg.mlp_activation)
  d.update(rope_to_hf(cfg))
  return d


def _layer_types(cfg: ModelConfig):
  sliding = [cfg.sliding_window is not None and i % cfg.sliding_window_pattern == 0
             for i in range(cfg.num_layers)]
  return ["sliding_attention" if s else "full_attention" for s in sliding]


def _llama_to_hf(cfg):
  if cfg.qkv_bias != cfg.o_bias:
    raise ValueError("model.qkv_bias != model.o_bias cannot be exported as HF llama")
  _check_no_extras(cfg, {"qkv_bias", "o_bias", "mlp_bias"}, "llama")
  if cfg.sliding_window is not None:
    raise ValueError("model.sliding_window cannot be exported as HF llama (use mistral)")
  return dict(_llama_like_to_hf(cfg), attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)


def _mistral_to_hf(cfg):
  _check_no_extras(cfg, set(), "mistral")
  if cfg.sliding_window is not None and cfg.sliding_window_pattern != 1:
    raise ValueError("model.sliding_window_pattern must be 1 for HF mistral")
  return dict(_llama_like_to_hf(cfg), sliding_window=cfg.sliding_window)


def _qwen_sliding(cfg):
  if cfg.sliding_window is not None and cfg.sliding_window_pattern != 1:
    raise ValueError(f"model.sliding_window_pattern must be 1 for HF {cfg.family}")
  return dict(use_sliding_window=cfg.sliding_window is not None,
              sliding_window=cfg.sliding_window, max_window_layers=0,
              layer_types=_layer_types(cfg))


def _qwen2_to_hf(cfg):
  if not cfg.qkv_bias:
    raise ValueError("model.qkv_bias=False cannot be exported as HF qwen2")
  _check_no_extras(cfg, {"qkv_bias"}, "qwen2")
  return dict(_llama_like_to_hf(cfg), **_qwen_sliding(cfg))


def _qwen3_to_hf(cfg):
  _check_no_extras(cfg, {"qkv_bias", "o_bias", "qk_norm"}, "qwen3")
  return dict(_llama_like_to_hf(cfg), attention_bias=cfg.qkv_bias, **_qwen_sliding(cfg))


_GEMMA = {"qkv_bias", "o_bias", "norm_plus_one", "embed_scale"}


def _gemma_to_hf(cfg):
  _check_no_extras(cfg, _GEMMA, "gemma")
  d = _llama_like_to_hf(cfg)
  return dict(d, attention_bias=cfg.qkv_bias, hidden_activation=cfg.mlp_activation)


def _gemma2_to_hf(cfg):
  _check_no_extras(cfg, _GEMMA | {"post_norms", "attn_logit_softcap", "final_logit_softcap",
                                  "query_pre_attn_scalar"}, "gemma2")
  if cfg.sliding_window is not None and cfg.sliding_window_pattern != 2:
    raise ValueError("model.sliding_window_pattern must be 2 for HF gemma2")
  return dict(_gemma_to_hf(cfg), attn_logit_softcapping=cfg.attn_logit_softcap,
              final_logit_softcapping=cfg.final_logit_softcap,
              query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.dim_per_head,
              sliding_window=cfg.sliding_window, layer_types=_layer_types(cfg))


def _gpt2_to_cfg(d):
  if d.get("scale_attn_by_inverse_layer_idx"):
    raise ValueError("config.json: scale_attn_by_inverse_layer_idx=true is not supported")
  if d.get("scale_attn_weights") is False:
    raise ValueError("config.json: scale_attn_weights=false is not supported")
  n_embd = d.get("n_embd", d.get("hidden_size"))
  n_head = d.get("n_head", d.get("num_attention_heads"))
  return dict(
      vocab_size=d["vocab_size"], hidden_size=n_embd,
      intermediate_size=d.get("n_inner") or 4 * n_embd,
      num_layers=d.get("n_layer", d.get("num_hidden_layers")), num_heads=n_head,
      num_kv_heads=n_head, max_position_embeddings=d.get("n_positions", 1024),
      norm_type="layernorm", norm_eps=d.get("layer_norm_epsilon", 1e-5),
      mlp_activation=_activation(d.get("activation_function", "gelu_new")), mlp_gated=False,
      qkv_bias=True, o_bias=True, mlp_bias=True, pos_embedding="learned",
      tie_embeddings=bool(d.get("tie_word_embeddings", True)))


def _gpt2_to_hf(cfg):
  _check_no_extras(cfg, {"qkv_bias", "o_bias", "mlp_bias"}, "gpt2")
  if not (cfg.qkv_bias and cfg.o_bias and cfg.mlp_bias) or cfg.mlp_gated:
    raise ValueError("HF gpt2 needs model.qkv_bias/o_bias/mlp_bias=True, mlp_gated=False")
  if cfg.num_kv_heads != cfg.num_heads or cfg.dim_per_head * cfg.num_heads != cfg.hidden_size:
    raise ValueError("HF gpt2 needs num_kv_heads == num_heads and head_dim * heads == hidden")
  return dict(vocab_size=cfg.vocab_size, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
              n_head=cfg.num_heads, n_inner=cfg.intermediate_size,
              n_positions=cfg.max_position_embeddings, layer_norm_epsilon=cfg.norm_eps,
              activation_function=cfg.mlp_activation, tie_word_embeddings=cfg.tie_embeddings,
              scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)


for _fam in (
    Family("llama", "LlamaForCausalLM", _llama_to_cfg, _llama_to_hf),
    Family("mistral", "MistralForCausalLM", _mistral_to_cfg, _mistral_to_hf),
    Family("qwen2", "Qwen2ForCausalLM", _qwen2_to_cfg, _qwen2_to_hf),
    Family("qwen3", "Qwen3ForCausalLM", _qwen3_to_cfg, _qwen3_to_hf),
    Family("gemma", "GemmaForCausalLM", _gemma_to_cfg, _gemma_to_hf),
    Family("gemma2", "Gemma2ForCausalLM", _gemma2_to_cfg, _gemma2_to_hf),
    Family("gpt2", "GPT2LMHeadModel", _gpt2_to_cfg, _gpt2_to_hf),
):
  register_family(_fam)


def optional_dtype(name: Optional[Any]) -> Optional[str]:
  """'bfloat16' for jnp.bfloat16 / 'bfloat16' / np dtype; None stays None."""
  if name is None:
    return None
  import numpy as np  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return np.dtype(jnp.dtype(name)).name
