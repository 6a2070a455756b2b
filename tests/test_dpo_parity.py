"""DPO loss family vs TRL 1.16: the real `DPOTrainer._compute_loss` on the same logits.

TRL's trainer is built without __init__ (`object.__new__`) and given a fake fused LM head that
computes its per-token log-probs from the same logits ftjax's fake model returns, with cached
reference log-probs (`precompute_ref_log_probs` path). Loss and every logged metric must match.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from trl.trainer.dpo_trainer import DPOTrainer

import test_pref_lib as lib
from ftjax.objectives import dpo as dpo_lib
from ftjax.objectives import get


def _trl_dpo(logits, ids, attn, comp, ref_c, ref_r, loss_types, weights, beta, ls):
  fake = lib.TorchFused([(torch.tensor(ids), torch.tensor(logits))]).train()
  t = lib.trainer_shell(
      DPOTrainer, model=fake, ld_alpha=None, precompute_ref_logps=True,
      f_divergence_type="reverse_kl", loss_types=loss_types, loss_weights=weights, beta=beta,
      label_smoothing=ls, use_weighting=False)
  inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(attn),
            "completion_mask": torch.tensor(comp), "ref_chosen_logps": torch.tensor(ref_c),
            "ref_rejected_logps": torch.tensor(ref_r)}
  loss = t._compute_loss(fake, inputs, False)
  return float(loss), {k: v[-1] for k, v in t._metrics["train"].items()}


def _ours(batch, logits, ref_c, ref_r, **cfg):
  batch = dict(batch, ref_chosen_logps=jnp.asarray(ref_c), ref_rejected_logps=jnp.asarray(ref_r))
  ctx = lib.ctx(lib.FakeModel(), reference="precomputed", **cfg)
  (s, n), m = get("dpo")({"logits": jnp.asarray(logits)}, batch, None, ctx)
  return float(s / n), lib.finalize(m)


@pytest.mark.parametrize("loss_type", dpo_lib.LOSS_TYPES)
def test_dpo_loss_types_match_trl(loss_type):
  batch, (ids, attn, comp), logits = lib.paired_batch(seed=1)
  rs = np.random.RandomState(2)
  ref_c = (rs.randn(4) * 3 - 12).astype(np.float32)
  ref_r = (rs.randn(4) * 3 - 12).astype(np.float32)
  ls = 0.1 if loss_type == "robust" else 0.0
  want, want_m = _trl_dpo(logits, ids, attn, comp, ref_c, ref_r, [loss_type], [1.0], 0.1, ls)
  got, got_m = _ours(batch, logits, ref_c, ref_r, loss_type=loss_type, beta=0.1,
                     label_smoothing=ls)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
            "mean_token_accuracy"):
    np.testing.assert_allclose(got_m[k], want_m[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_rpo_matches_trl_sigmoid_plus_sft():
  batch, (ids, attn, comp), logits = lib.paired_batch(seed=3)
  ref_c = np.full(4, -10.0, np.float32)
  ref_r = np.full(4, -11.0, np.float32)
  want, _ = _trl_dpo(logits, ids, attn, comp, ref_c, ref_r, ["sigmoid", "sft"], [1.0, 0.7],
                     0.2, 0.0)
  got, _ = _ours(batch, logits, ref_c, ref_r, loss_type="sigmoid", beta=0.2, rpo_alpha=0.7)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_conservative_dpo_label_smoothing():
  # TRL 1.16 dropped label smoothing from 'sigmoid'; cDPO is TRL <= 0.x's formula
  # (-(1-ls) logsigmoid(b d) - ls logsigmoid(-b d)), replicated here in torch.
  rs = np.random.RandomState(0)
  lr_c, lr_r = rs.randn(8).astype(np.float32) * 4, rs.randn(8).astype(np.float32) * 4
  beta, ls = 0.3, 0.15
  d = torch.tensor(lr_c - lr_r)
  want = -(1 - ls) * F.logsigmoid(beta * d) - ls * F.logsigmoid(-beta * d)
  got = dpo_lib.dpo_losses("sigmoid", jnp.asarray(lr_c), jnp.asarray(lr_r), beta=beta,
                           label_smoothing=ls)
  np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-5)


def test_reference_free_and_copy_modes():
  batch, _, logits = lib.paired_batch(seed=4)
  params = {"logits": jnp.asarray(logits)}
  fn = get("dpo")
  (s0, n0), _ = fn(params, batch, None, lib.ctx(lib.FakeModel(), reference="none"))
  zeros = jnp.zeros(4)
  (s1, _), _ = fn(params, dict(batch, ref_chosen_logps=zeros, ref_rejected_logps=zeros), None,
                  lib.ctx(lib.FakeModel(), reference="precomputed"))
  np.testing.assert_allclose(float(s0), float(s1), rtol=1e-6)
  # 'copy' with the policy itself as reference: every log-ratio is 0 -> loss log 2 per pair.
  c = lib.ctx(lib.FakeModel(), reference="copy")
  c.ref_params = params
  (s2, n2), m = fn(params, batch, None, c)
  np.testing.assert_allclose(float(s2 / n2), np.log(2.0), rtol=1e-6)
  assert lib.finalize(m)["rewards/margins"] == 0.0


@pytest.mark.parametrize("cfg, match", [
    (dict(beta=0.0), "beta"), (dict(beta=-1.0), "beta"),
    (dict(loss_type="nope"), "sigmoid"),
    (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
    (dict(reference="copy"), "reference"), (dict(reference="precomputed"), "precompute"),
    (dict(reference="bogus"), "reference"),
])
def test_dpo_bad_config(cfg, match):
  batch, _, logits = lib.paired_batch()
  with pytest.raises(ValueError, match=match):
    get("dpo")({"logits": jnp.asarray(logits)}, batch, None, lib.ctx(lib.FakeModel(), **cfg))


def test_unknown_objective_lists_registered():
  with pytest.raises(ValueError, match="dpo.*kto.*orpo.*reward.*simpo"):
    get("dpoo")
