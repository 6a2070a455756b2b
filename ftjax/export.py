"""`ftjax export`: a training workdir -> a Hugging Face model dir (merged) or a PEFT adapter dir.

A reward-model run (model.head 'reward' or objective 'reward') is written as
`AutoModelForSequenceClassification` (num_labels=1, `ftjax.models.reward.export_reward_hf`);
with --adapter, as a PEFT SEQ_CLS adapter whose modules_to_save holds the trained `score` head
(`PeftModel.from_pretrained` on the base `AutoModelForSequenceClassification`).
"""

from __future__ import annotations

import json
import logging
import os

import ml_collections


def load_run(workdir: str):
  """(config, model_cfg, params, tokenizer) of the latest checkpoint of a training workdir."""
  from ftjax import data  # pylint: disable=g-import-not-at-top
  from ftjax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from ftjax.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  from ftjax.train.step import merge_params  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"--workdir {workdir}: no config.json (not a training workdir)")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  tokenizer = data.load_tokenizer(config.data.get("tokenizer"))
  model_cfg = state_lib.model_config(config, tokenizer)
  if state_lib._peft_on(config):  # pylint: disable=protected-access
    from ftjax import peft  # pylint: disable=g-import-not-at-top
    model_cfg = peft.apply_peft(model_cfg, config.peft)
  ck = Checkpointer(os.path.join(workdir, "checkpoints"),
                    ml_collections.ConfigDict({"async_save": False}))
  trainable, frozen, _ = ck.restore_params()
  ck.close()
  return config, model_cfg, merge_params(trainable, frozen), tokenizer


def is_reward_run(config, model_cfg) -> bool:
  return model_cfg.head == "reward" or config.objective.get("name") == "reward"


def _export_reward(params, model_cfg, out_dir: str, tokenizer) -> str:
  """The merged reward model as an HF sequence-classification dir (score read where ftjax reads)."""
  from ftjax.models.reward import export_reward_hf  # pylint: disable=g-import-not-at-top
  pad = getattr(tokenizer, "pad_token_id", None)
  if pad is None:
    raise ValueError("reward export: the run's tokenizer has no pad token; transformers reads the "
                     "score at the last token that is not pad_token_id")
  if pad == getattr(tokenizer, "eos_token_id", None):
    # ftjax scores the final eos; transformers skips every pad id, so it scores the token before.
    logging.warning("reward export: pad_token_id == eos_token_id (%d): transformers will read the "
                    "score one token before ftjax does (give the tokenizer a distinct pad token)",
                    pad)
  params = {k: v for k, v in params.items() if k != "lm_head"}  # peft.merge may untie a head
  return export_reward_hf(params, model_cfg.replace(head="reward"), out_dir,
                          tokenizer, pad_token_id=pad)


def export_workdir(workdir: str, out_dir: str, adapter_only: bool = False) -> str:
  from ftjax.models import hf  # pylint: disable=g-import-not-at-top
  config, model_cfg, params, tokenizer = load_run(workdir)
  peft_on = config.peft.get("method", "none") not in ("none", "", None)
  reward = is_reward_run(config, model_cfg)
  if adapter_only:
    if not peft_on or config.peft.method == "hft":
      raise ValueError("--adapter: this run has no LoRA/DoRA adapter (config.peft.method="
                       f"{config.peft.get('method')!r})")
    from ftjax import peft  # pylint: disable=g-import-not-at-top
    peft.export_adapter(params, model_cfg, out_dir,
                        base_model_name_or_path=config.model.get("hf_path") or None)
    if tokenizer is not None:
      tokenizer.save_pretrained(out_dir)
    return out_dir
  if peft_on and config.peft.method != "hft":
    from ftjax import peft  # pylint: disable=g-import-not-at-top
    params, model_cfg = peft.merge(params, model_cfg)
  if reward:
    return _export_reward(params, model_cfg, out_dir, tokenizer)
  # base_config: the source HF dir's token ids and generation_config.json carry over.
  hf.export_hf(params, model_cfg, out_dir, tokenizer=tokenizer,
               base_config=config.model.get("hf_path") or None)
  return out_dir
