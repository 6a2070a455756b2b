"""Model hyper-parameters: one frozen dataclass for every decoder family.

Family quirks are switches here, not separate decoders (see `transformer.py`). The dataclass is
hashable so it can be a linen module attribute, and `from_config_dict` builds it from the
`config.model` ConfigDict of an experiment.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  # Sizes.
  vocab_size: int = 256
  hidden_size: int = 64
  intermediate_size: int = 176
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: Optional[int] = None  # None -> hidden_size // num_heads
  max_position_embeddings: int = 2048

  # Family switches (defaults = Llama).
  family: str = "llama"
  norm_type: str = "rms"  # rms | layernorm
  norm_eps: float = 1e-5
  norm_plus_one: bool = False  # Gemma: x * (1 + w)
  embed_scale: bool = False  # Gemma: embeddings * sqrt(hidden) in the activation dtype
  mlp_activation: str = "silu"  # silu | gelu_tanh | gelu | gelu_new | relu
  mlp_gated: bool = True  # SwiGLU/GeGLU (gate_proj, up_proj, down_proj) vs GPT-2 (c_fc, c_proj)
  qkv_bias: bool = False  # Qwen2, GPT-2
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k
  post_norms: bool = False  # Gemma 2: post-attention and post-feedforward norms
  attn_logit_softcap: Optional[float] = None
  final_logit_softcap: Optional[float] = None
  query_pre_attn_scalar: Optional[float] = None  # scale = query_pre_attn_scalar ** -0.5
  sliding_window: Optional[int] = None
  sliding_window_pattern: int = 1  # 1: every layer; 2: even layers (Gemma 2)
  pos_embedding: str = "rope"  # rope | learned
  rope_theta: float = 10000.0
  # Hashable rope scaling: (("rope_type", "llama3"), ("factor", 8.0), ...).
  rope_scaling: Optional[Tuple[Tuple[str, Any], ...]] = None
  tie_embeddings: bool = False
  # 'lm': vocab logits; 'reward': a scalar 'score' head [hidden, 1] instead of lm_head (HF
  # ForSequenceClassification, num_labels=1), output [B, T, 1]; see ftjax/models/reward.py.
  head: str = "lm"

  # Mixture of experts (0 = dense MLP).
  num_experts: int = 0
  num_experts_per_tok: int = 2
  moe_intermediate_size: Optional[int] = None
  moe_router: str = "softmax_topk"  # softmax_topk | topk_softmax | sigmoid_bias
  moe_norm_topk_prob: bool = True
  moe_shared_intermediate_size: int = 0  # Qwen2-MoE shared expert (0 = none)
  moe_dispatch: str = "dropless"  # dropless | capacity
  moe_capacity_factor: float = 1.25

  # Numerics and compilation.
  dtype: str = "float32"  # activation/compute dtype
  param_dtype: str = "float32"
  # None (auto: jax on GPU, flash on CPU, xla on TPU) | flash | xla | cudnn | jax
  attention_impl: Optional[str] = None
  remat_policy: str = "none"  # none | full | dots | dots_with_no_batch_dims
  scan_unroll: int = 1  # layers are always scanned; unroll>1 trades compile time for speed
  # > 0: incremental decoding with a KV cache of this many slots ('cache' collection; see
  # ftjax/generate.py). Params are the same as without; only generation sets it.
  decode_cache: int = 0

  # Parameter-efficient fine-tuning: a hashable ftjax.peft.AdapterSpec (LoRA/DoRA/NF4) or None.
  # Set by ftjax.peft.apply_peft, read by ftjax.peft.adapt_linear inside every Linear.
  peft: Optional[Any] = None

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"model.num_heads={self.num_heads} is not a multiple of "
          f"model.num_kv_heads={self.num_kv_heads}")
    if self.num_experts and self.num_experts_per_tok > self.num_experts:
      raise ValueError(
          f"model.num_experts_per_tok={self.num_experts_per_tok} > "
          f"model.num_experts={self.num_experts}")

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    """Parameter count of the dense model (embeddings included, head counted once if tied)."""
    d, f, l = self.hidden_size, self.intermediate_size, self.num_layers
    q = self.num_heads * self.dim_per_head
    kv = self.num_kv_heads * self.dim_per_head
    attn = d * q + 2 * d * kv + q * d
    mlp = (3 if self.mlp_gated else 2) * d * f
    if self.num_experts:
      fe = self.moe_intermediate_size or f
      mlp = self.num_experts * 3 * d * fe + d * self.num_experts
      mlp += 3 * d * self.moe_shared_intermediate_size
    norms = (4 if self.post_norms else 2) * d + (2 * self.dim_per_head if self.qk_norm else 0)
    emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return l * (attn + mlp + norms) + emb + d


def from_config_dict(cd) -> ModelConfig:
  """Builds a ModelConfig from `config.model` (a ConfigDict or dict); unknown keys are an error."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  items = dict(cd.items()) if hasattr(cd, "items") else dict(cd)
  kw = {}
  for k, v in items.items():
    if k in ("hf_path", "init_from", "tokenizer"):
      continue  # loading concerns, not architecture
    if k not in fields:
      raise ValueError(f"config.model.{k}: unknown model field (known: {sorted(fields)})")
    if k == "rope_scaling" and v is not None and not isinstance(v, tuple):
      v = tuple(sorted(dict(v).items()))
    kw[k] = v
  return ModelConfig(**kw)
