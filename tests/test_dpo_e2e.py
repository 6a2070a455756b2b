"""End to end on a tiny random HF Llama: ftjax's concatenated-forward per-sequence log-probs and
DPO loss equal TRL 1.16's (`DPOTrainer._compute_loss` with its fused LM head on the torch model,
batch from TRL's own `DataCollatorForPreference`); the LoRA 'adapters_off' reference equals the
base model; `precompute_reference` caches what the 'copy' reference computes."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer
from trl.trainer.utils import add_fused_lm_head

import test_pref_lib as lib
from ftjax import peft
from ftjax.models import Decoder, hf, hf_testing
from ftjax.objectives import ObjectiveContext, get
from ftjax.objectives import preference as pref


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = hf_testing.save_tiny("llama", tmp_path_factory.mktemp("llama") / "hf")
  cfg, params = hf.load_hf(path)
  return path, cfg, params


def _examples(vocab, n=3, seed=0):
  rs = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    out.append({"prompt_ids": rs.randint(1, vocab, rs.randint(2, 6)).tolist(),
                "chosen_ids": rs.randint(1, vocab, rs.randint(1, 6)).tolist(),
                "rejected_ids": rs.randint(1, vocab, rs.randint(1, 6)).tolist()})
  return out


def _ftjax_batch(collated, b):
  ids, attn, comp = (collated[k].numpy() for k in ("input_ids", "attention_mask",
                                                   "completion_mask"))
  batch = dict(lib.jax_rows(ids[:b], attn[:b], comp[:b], "chosen_"))
  batch.update(lib.jax_rows(ids[b:], attn[b:], comp[b:], "rejected_"))
  return batch


@pytest.mark.parametrize("ld_alpha, use_weighting", [(None, False), (0.5, True)])
def test_dpo_logps_and_loss_match_trl(tiny, ld_alpha, use_weighting):
  """(0.5, True): LD-DPO and WPO, whose log Σ p² comes from TRL's own fused LM head."""
  path, cfg, params = tiny
  examples = _examples(cfg.vocab_size)
  collated = DataCollatorForPreference(pad_token_id=0)(examples)
  ref_c = np.array([-30.0, -25.0, -40.0], np.float32)
  ref_r = np.array([-31.0, -20.0, -38.0], np.float32)
  collated["ref_chosen_logps"] = torch.tensor(ref_c)
  collated["ref_rejected_logps"] = torch.tensor(ref_r)

  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1",
                                    "log_sum_sq_probs"))
  model.train()  # no dropout in Llama; TRL logs train metrics
  t = lib.trainer_shell(DPOTrainer, model=model, ld_alpha=ld_alpha, precompute_ref_logps=True,
                        f_divergence_type="reverse_kl", loss_types=["sigmoid"],
                        loss_weights=[1.0], beta=0.1, label_smoothing=0.0,
                        use_weighting=use_weighting)
  want = float(t._compute_loss(model, dict(collated), False).detach())
  want_m = {k: v[-1] for k, v in t._metrics["train"].items()}

  batch = _ftjax_batch(collated, len(examples))
  batch.update(ref_chosen_logps=jnp.asarray(ref_c), ref_rejected_logps=jnp.asarray(ref_r))
  ctx = ObjectiveContext(model=Decoder(cfg), config=ml_collections.ConfigDict(
      {"loss_type": "sigmoid", "beta": 0.1, "reference": "precomputed", "ld_alpha": ld_alpha,
       "use_weighting": use_weighting}))
  (s, n), m = jax.jit(lambda p, b: get("dpo")(p, b, None, ctx))(params, batch)
  got_m = lib.finalize(m)
  np.testing.assert_allclose(float(s / n), want, rtol=1e-5, atol=1e-6)
  for k in ("logps/chosen", "logps/rejected", "rewards/margins", "logits/chosen",
            "logits/rejected", "mean_token_accuracy"):
    np.testing.assert_allclose(got_m[k], want_m[k], rtol=1e-4, atol=1e-4, err_msg=k)


def test_adapters_off_reference_is_the_base_model(tiny):
  _, cfg, params = tiny
  lcfg = peft.apply_peft(cfg, ml_collections.ConfigDict(
      {"method": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"}))
  model = Decoder(lcfg)
  lparams = peft.init_adapters(params, model, jax.random.key(1), jnp.zeros((1, 4), jnp.int32))
  # non-zero B, so the adapted policy differs from the base model
  lparams = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 if "lora_B" in jax.tree_util.keystr(p) else x, lparams)
  collated = DataCollatorForPreference(pad_token_id=0)(_examples(cfg.vocab_size, seed=1))
  batch = _ftjax_batch(collated, 3)
  rows = pref.concat_rows(batch, ("chosen_", "rejected_"))

  def ref_logps(mode, model_, p, ref_params=None):
    ctx = ObjectiveContext(model=model_, config=ml_collections.ConfigDict({"reference": mode}),
                           ref_params=ref_params)
    return jax.jit(lambda p_: pref.reference_logps(p_, rows, batch, ctx, ()))(p)

  off = ref_logps("adapters_off", model, lparams)
  base = ref_logps("copy", Decoder(cfg), params, ref_params=params)
  policy = jax.jit(lambda p: pref.sequence_stats(model, p, rows)["logps"])(lparams)
  np.testing.assert_allclose(np.asarray(off), np.asarray(base), rtol=1e-5, atol=1e-4)
  assert np.abs(np.asarray(policy) - np.asarray(base)).max() > 1e-3
  # Modules trained in full are not switched off with the adapters: no silent wrong reference.
  saving = Decoder(lcfg.replace(peft=dataclasses.replace(lcfg.peft, modules_to_save=("lm_head",))))
  with pytest.raises(ValueError, match="modules_to_save"):
    ref_logps("adapters_off", saving, lparams)

  # cached reference == the 'copy' reference, looked up by example_id
  host = {k: np.asarray(v) for k, v in batch.items()}
  host["example_id"] = np.array([7, 3, 5], np.int32)
  table = pref.precompute_reference(Decoder(cfg), params, [host])
  got = pref.attach_reference(dict(host, example_id=np.array([5, 7, -1], np.int32)), table)
  b = np.asarray(base)
  np.testing.assert_allclose(got["ref_chosen_logps"], [b[2], b[0], 0.0], rtol=1e-5)
  np.testing.assert_allclose(got["ref_rejected_logps"], [b[5], b[3], 0.0], rtol=1e-5)
