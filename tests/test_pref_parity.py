"""SimPO/CPO, ORPO and KTO vs TRL 1.16, each through TRL's own loss code on the same logits.

CPO/SimPO and ORPO: TRL's `get_batch_loss_metrics` (its concatenated forward, log-prob averaging,
NLL and loss) with a fake torch model returning the logits ftjax's fake model returns.
KTO: TRL's `KTOTrainer._compute_loss` with a fake fused LM head and cached reference log-probs.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import types
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.kto_trainer import KTOTrainer

import test_pref_lib as lib
from ftjax.objectives import get


class _LogitsModel(torch.nn.Module):
  def __init__(self, logits):
    super().__init__()
    self.logits = torch.tensor(logits)

  def forward(self, input_ids, attention_mask=None, use_cache=False, **kw):
    assert input_ids.shape == self.logits.shape[:2]
    return types.SimpleNamespace(logits=self.logits)


def _trl_paired_batch(ids, attn, comp, b):
  labels = np.where(comp == 1, ids, -100)
  t = lambda x: torch.tensor(x)
  return {"chosen_input_ids": t(ids[:b]), "chosen_attention_mask": t(attn[:b]),
          "chosen_labels": t(labels[:b]), "rejected_input_ids": t(ids[b:]),
          "rejected_attention_mask": t(attn[b:]), "rejected_labels": t(labels[b:])}


def _ours(name, batch, logits, **cfg):
  (s, n), m = get(name)({"logits": jnp.asarray(logits)}, batch, None,
                        lib.ctx(lib.FakeModel(), **cfg))
  return float(s / n), lib.finalize(m)


_PAIR_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected", "nll_loss")


@pytest.mark.parametrize("loss_type, cpo_alpha, ls", [
    ("simpo", 0.0, 0.0), ("simpo", 1.0, 0.1), ("sigmoid", 1.0, 0.0), ("hinge", 0.5, 0.0),
    ("ipo", 0.0, 0.0)])
def test_cpo_simpo_match_trl(loss_type, cpo_alpha, ls):
  batch, (ids, attn, comp), logits = lib.paired_batch(seed=5)
  t = lib.trainer_shell(CPOTrainer, is_encoder_decoder=False, pad_token_id=0, beta=2.0,
                        label_smoothing=ls, loss_type=loss_type, cpo_alpha=cpo_alpha,
                        simpo_gamma=0.8, alpha=0.0)
  want, want_m = t.get_batch_loss_metrics(_LogitsModel(logits), _trl_paired_batch(ids, attn, comp, 4))
  name = "simpo" if loss_type == "simpo" else "cpo"
  got, got_m = _ours(name, batch, logits, loss_type=loss_type, beta=2.0, cpo_alpha=cpo_alpha,
                     simpo_gamma=0.8, label_smoothing=ls)
  np.testing.assert_allclose(got, float(want), rtol=1e-5)
  for k in _PAIR_KEYS:
    if k == "nll_loss" and cpo_alpha == 0:
      continue  # TRL skips the NLL (reports 0) when cpo_alpha == 0
    np.testing.assert_allclose(got_m[k], want_m[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_orpo_matches_trl():
  batch, (ids, attn, comp), logits = lib.paired_batch(seed=6)
  t = lib.trainer_shell(ORPOTrainer, is_encoder_decoder=False, padding_value=0, beta=0.25)
  want, want_m = t.get_batch_loss_metrics(_LogitsModel(logits), _trl_paired_batch(ids, attn, comp, 4))
  got, got_m = _ours("orpo", batch, logits, beta=0.25)
  np.testing.assert_allclose(got, float(want), rtol=1e-5)
  for k in _PAIR_KEYS + ("log_odds_ratio", "log_odds_chosen"):
    np.testing.assert_allclose(got_m[k], float(want_m[k]), rtol=1e-5, atol=1e-6, err_msg=k)


def _kto_data(seed=7, b=6, t=9, vocab=11):
  rs = np.random.RandomState(seed)
  ids, attn, comp = lib.random_rows(rs, b, t, vocab)
  kids, kattn, kcomp = lib.random_rows(rs, b, t, vocab)
  labels = np.array([1, 0, 1, 1, 0, 0][:b], bool)
  logits = (rs.randn(2 * b, t, vocab) * 2).astype(np.float32)
  ref = (rs.randn(b) * 2 - 12).astype(np.float32)
  ref_kl = (rs.randn(b) * 2 - 16).astype(np.float32)
  return (ids, attn, comp), (kids, kattn, kcomp), labels, logits, ref, ref_kl


@pytest.mark.parametrize("loss_type, wd, wu", [("kto", 1.0, 1.0), ("kto", 1.3, 0.7),
                                               ("apo_zero_unpaired", 1.0, 1.0)])
def test_kto_matches_trl(loss_type, wd, wu):
  (ids, attn, comp), (kids, kattn, kcomp), labels, logits, ref, ref_kl = _kto_data()
  b = len(labels)
  tt = torch.tensor
  fake = lib.TorchFused([(tt(ids), tt(logits[:b])), (tt(kids), tt(logits[b:]))]).train()
  t = lib.trainer_shell(KTOTrainer, model=fake, calculate_KL=loss_type == "kto",
                        precompute_ref_logps=True, loss_type=loss_type, beta=0.1,
                        desirable_weight=wd, undesirable_weight=wu)
  inputs = {"input_ids": tt(ids), "attention_mask": tt(attn), "completion_mask": tt(comp),
            "label": tt(labels), "KL_input_ids": tt(kids), "KL_attention_mask": tt(kattn),
            "KL_completion_mask": tt(kcomp), "ref_logps": tt(ref), "ref_KL_logps": tt(ref_kl)}
  want = float(t._compute_loss(fake, inputs, False))
  want_m = {k: v[-1] for k, v in t._metrics["train"].items()}
  batch = dict(lib.jax_rows(ids, attn, comp), **lib.jax_rows(kids, kattn, kcomp, "kl_"),
               label=jnp.asarray(labels, jnp.int32), ref_logps=jnp.asarray(ref),
               ref_kl_logps=jnp.asarray(ref_kl))
  used = logits if loss_type == "kto" else logits[:b]  # no KL rows without the KL term
  got, got_m = _ours("kto", batch, used, reference="precomputed", loss_type=loss_type,
                     beta=0.1, desirable_weight=wd, undesirable_weight=wu)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for k in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
            "logps/rejected", "logits/chosen", "logits/rejected"):
    np.testing.assert_allclose(got_m[k], want_m[k], rtol=1e-5, atol=1e-5, err_msg=k)
  if loss_type == "kto":
    assert want_m["kl"] >= 0.0


def test_kto_batch_of_one_is_an_error():
  (ids, attn, comp), (kids, kattn, kcomp), labels, logits, ref, ref_kl = _kto_data(b=1)
  batch = dict(lib.jax_rows(ids, attn, comp), **lib.jax_rows(kids, kattn, kcomp, "kl_"),
               label=jnp.asarray(labels, jnp.int32))
  with pytest.raises(ValueError, match="batch_size"):
    _ours("kto", batch, logits, reference="none")


@pytest.mark.parametrize("name", ["simpo", "orpo", "kto"])
def test_beta_must_be_positive(name):
  batch, _, logits = lib.paired_batch()
  with pytest.raises(ValueError, match="beta"):
    _ours(name, batch, logits, beta=0.0)
