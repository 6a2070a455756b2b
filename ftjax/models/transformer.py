"""One decoder for every family (Llama, Mistral, Qwen2/3, Gemma/Gemma 2, GPT-2, MoE variants).

Layers are always `nn.scan`ned: parameters of layer i live at index i of a stacked leading
'layers' axis, compile time does not grow with depth, and HF conversion is one table.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.models.attention import Attention
from ftjax.models.config import ModelConfig
from ftjax.models.layers import MLP, Embed, Linear, Norm, constrain, rope_tables

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, layer_idx, rope, segment_ids):
    cfg = self.cfg
    h = Norm(cfg, name="input_layernorm")(x)
    h = Attention(cfg, name="self_attn")(h, rope, segment_ids, layer_idx)
    if cfg.post_norms:
      h = Norm(cfg, name="post_attention_layernorm")(h)
    x = x + h
    pre_mlp = "pre_feedforward_layernorm" if cfg.post_norms else "post_attention_layernorm"
    h = Norm(cfg, name=pre_mlp)(x)
    if cfg.num_experts:
      from ftjax.models.moe import MoEBlock  # pylint: disable=g-import-not-at-top
      h = MoEBlock(cfg, name="mlp")(h, segment_ids)
    else:
      h = MLP(cfg, name="mlp")(h)
    if cfg.post_norms:
      h = Norm(cfg, name="post_feedforward_layernorm")(h)
    x = constrain(x + h, ("batch", "length", "act_embed"))
    return x, None


class Decoder(nn.Module):
  """tokens [B, T] int32 -> logits [B, T, V] float32 (or final hidden states [B, T, D])."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed_tokens = Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                    ("vocab", "embed")), cfg=cfg)
    if cfg.pos_embedding == "learned":
      self.embed_positions = nn.Embed(
          cfg.max_position_embeddings, cfg.hidden_size, dtype=cfg.compute_dtype,
          param_dtype=cfg.weight_dtype,
          embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.01),
                                                      (None, "embed")))
    block = Block
    if cfg.remat_policy != "none":
      block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    self.layers = nn.scan(
        block,
        variable_axes={"params": 0, "aux": 0, "intermediates": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0, nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
        unroll=cfg.scan_unroll,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(cfg, name="layers")
    self.norm = Norm(cfg, name="norm")
    if cfg.head == "reward":  # scalar reward head (ftjax/models/reward.py)
      self.score = nn.Dense(
          1, use_bias=False, dtype=jnp.float32, param_dtype=cfg.weight_dtype,
          kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                   ("embed", None)))
    else:  # tied: declares no kernel, only LoRA leaves when config.peft targets lm_head
      self.lm_head = Linear(cfg.vocab_size, ("embed", "vocab"), cfg, name="lm_head")

  def __call__(self, tokens: jax.Array, positions: Optional[jax.Array] = None,
               segment_ids: Optional[jax.Array] = None, return_hidden: bool = False):
    cfg = self.cfg
    b, t = tokens.shape
    # segment_ids None = one unpadded sequence per row: attention then needs only the causal
    # mask (the flash path masks just its diagonal blocks); MoE treats every token as real.
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = self.embed_tokens(tokens)
    if cfg.embed_scale:  # Gemma rounds the normaliser to the activation dtype first
      x = x * jnp.asarray(cfg.hidden_size ** 0.5, x.dtype)
    if cfg.pos_embedding == "learned":
      x = x + self.embed_positions(positions)
    x = constrain(x, ("batch", "length", "act_embed"))
    rope = rope_tables(positions, cfg, x.dtype) if cfg.pos_embedding == "rope" else None
    x, _ = self.layers(x, jnp.arange(cfg.num_layers), rope, segment_ids)
    x = self.norm(x)
    if return_hidden:
      return x
    return self.logits(x)

  def logits(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    if cfg.head == "reward":
      return self.score(x.astype(jnp.float32))  # [B, T, 1]
    if cfg.tie_embeddings and cfg.peft is None:
      logits = self.embed_tokens.attend(x)
    elif cfg.tie_embeddings:  # PEFT: the head sees the base table (+ its own adapter, if any)
      logits = self.lm_head(x, tied_kernel=self.embed_tokens.table().T)
    else:
      logits = self.lm_head(x)
    logits = logits.astype(jnp.float32)
    if cfg.final_logit_softcap is not None:
      logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
    return constrain(logits, ("batch", "length", "act_vocab"))
