"""Reward model: the decoder with a scalar head read at the last non-pad token.

Layout is Hugging Face's `AutoModelForSequenceClassification` with num_labels=1: the decoder
with ModelConfig.head='reward' has no lm_head and a `score.kernel` [hidden, 1] (HF `score.weight`
[1, hidden], no bias), so the train loop, sharding and PEFT treat it like any decoder. The score is read where HF reads it: the last position whose token is real (here
segment_ids > 0; HF uses input_ids != pad_token_id, so keep pad ids out of the sequences).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftjax.models.transformer import Decoder


class RewardModel(Decoder):
  """tokens [B, T] -> rewards [B] float32 (or per-position scores [B, T] with all_positions).

  The decoder with cfg.head == 'reward' (build it with `reward_model(cfg)`): same params as
  `Decoder(cfg)` trains in the loop, read at the last real token here.
  """

  def __call__(self, tokens: jax.Array, positions: Optional[jax.Array] = None,
               segment_ids: Optional[jax.Array] = None, all_positions: bool = False):
    if self.cfg.head != "reward":
      raise ValueError("RewardModel needs model.head='reward' (use reward_model(cfg))")
    scores = super().__call__(tokens, positions=positions, segment_ids=segment_ids)[..., 0]
    if all_positions:
      return scores
    return gather_last(scores, segment_ids)


def reward_model(cfg) -> RewardModel:
  return RewardModel(cfg.replace(head="reward"))


def last_index(segment_ids: Optional[jax.Array], length: int, batch: int) -> jax.Array:
  """[B] index of the last real token (segment_ids > 0); length - 1 without segment ids."""
  if segment_ids is None:
    return jnp.full((batch,), length - 1, jnp.int32)
  t = jnp.arange(length, dtype=jnp.int32)
  return jnp.max(jnp.where(segment_ids > 0, t, 0), axis=-1)


def gather_last(scores: jax.Array, segment_ids: Optional[jax.Array]) -> jax.Array:
  b, t = scores.shape
  idx = last_index(segment_ids, t, b)
  return jnp.take_along_axis(scores, idx[:, None], axis=-1)[:, 0]


def as_reward_model(model) -> RewardModel:
  """The reward model for a decoder module (same config, head='reward'), or the module itself."""
  return model if isinstance(model, RewardModel) else reward_model(model.cfg)


def init_score(rng, hidden_size: int, dtype=jnp.float32) -> dict:
  """A fresh {'kernel': [hidden, 1]} score head, to add to pretrained decoder params."""
  return {"kernel": (0.02 * jax.random.normal(rng, (hidden_size, 1))).astype(dtype)}


# ----------------------------------------------------------------------------- HF interchange

def _reward_rules(cfg):
  """The decoder's HF table without lm_head, plus `score.weight` [1, hidden] <-> score.kernel."""
  from ftjax.models import hf_weights  # pylint: disable=g-import-not-at-top
  rules, ignore = hf_weights.table_for(cfg)
  rules = [r for r in rules if r.hf != "lm_head.weight"]
  rules.append(hf_weights.Rule("score.weight", (("score", "kernel"),), "linear"))
  return rules, ignore


def _architecture(cfg) -> str:
  from ftjax.models.hf_config import FAMILIES  # pylint: disable=g-import-not-at-top
  return FAMILIES[cfg.family].architecture.replace("ForCausalLM", "ForSequenceClassification")


def export_reward_hf(params, cfg, out_dir: str, tokenizer=None, *, pad_token_id: int,
                     dtype=None) -> str:
  """Writes a dir `transformers.AutoModelForSequenceClassification` loads (num_labels=1).

  params: RewardModel params (decoder without lm_head + score). pad_token_id: HF reads the score
  at the last token that is not the pad id, so it must be the id padding uses.
  """
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from ftjax.models import hf, hf_io  # pylint: disable=g-import-not-at-top
  flat = traverse_util.flatten_dict(nn.unbox(params))
  rules, _ = _reward_rules(cfg)
  covered = {p for r in rules for p in r.paths}
  if set(flat) != covered:
    raise ValueError(f"export_reward_hf: params do not match a reward model "
                     f"(extra {sorted(map('/'.join, set(flat) - covered))[:4]}, "
                     f"missing {sorted(map('/'.join, covered - set(flat)))[:4]})")
  items, produce = hf.export_plan(rules, flat, dtype)
  os.makedirs(out_dir, exist_ok=True)
  d = hf._export_config(cfg, None, tokenizer)  # pylint: disable=protected-access
  d.update(architectures=[_architecture(cfg)], num_labels=1, pad_token_id=int(pad_token_id),
           id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(d, f, indent=2, sort_keys=True)
  hf_io.write_checkpoint(out_dir, items, produce(), hf.DEFAULT_SHARD_BYTES)
  hf._save_tokenizer(tokenizer, out_dir)  # pylint: disable=protected-access
  return out_dir


def load_reward_hf(path: str):
  """(ModelConfig, RewardModel params) from an HF sequence-classification dir (num_labels=1)."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from ftjax.models import hf, hf_io  # pylint: disable=g-import-not-at-top
  cfg = hf.config_from_hf(path).replace(head="reward")
  model = RewardModel(cfg)
  boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 1), jnp.int32))["params"],
                         jax.random.key(0))
  flat = traverse_util.flatten_dict(nn.unbox(boxed))
  rules, _ = _reward_rules(cfg)
  tensors = hf_io.checkpoint_index(path)
  out = {}
  with hf_io.Reader(tensors) as reader:
    for rule in rules:
      names = hf._indices(rule, flat[rule.paths[0]].shape)  # pylint: disable=protected-access
      missing = [n for n, _ in names if n not in tensors]
      if missing:
        raise ValueError(f"{path}: missing tensor(s) {missing[:4]} for a reward model "
                         "(AutoModelForSequenceClassification, num_labels=1)")
      out.update(hf._load_rule(rule, flat, None, reader, names, path))  # pylint: disable=protected-access
  return cfg, traverse_util.unflatten_dict(out)


def from_causal_lm(params, rng, hidden_size: int) -> dict:
  """Reward params from decoder params: lm_head dropped, a fresh score head added."""
  out = {k: v for k, v in params.items() if k != "lm_head"}
  out["score"] = init_score(rng, hidden_size, params["embed_tokens"]["embedding"].dtype)
  return out
