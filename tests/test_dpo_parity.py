"""DPO loss family vs TRL 1.16: the real `DPOTrainer._compute_loss` on the same logits.

TRL's trainer is built without __init__ (`object.__new__`) and given a fake fused LM head that
computes its per-token log-probs from the same logits ftjax's fake model returns, with cached
reference log-probs (`precompute_ref_log_probs` path). Loss and every logged metric must match.
"""

import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from trl.trainer.dpo_trainer import DPOTrainer

import test_pref_lib as lib
from ftjax.objectives import dpo as dpo_lib
from ftjax.objectives import get


def _trl_dpo(logits, ids, attn, comp, ref_c, ref_r, loss_types, weights, beta, ls,
             f_div="reverse_kl", f_alpha=0.5, tau=0.05, ld_alpha=None, use_weighting=False,
             ref_logits=None):
  """TRL's loss and metrics; ref_logits given: a reference model forward instead of ref_c/r."""
  fake = lib.TorchFused([(torch.tensor(ids), torch.tensor(logits))]).train()
  fake.is_gradient_checkpointing = False  # read by TRL's reference forward
  ref_model = None
  if ref_logits is not None:
    ref_model = lib.TorchFused([(torch.tensor(ids), torch.tensor(ref_logits))]).eval()
  t = lib.trainer_shell(
      DPOTrainer, model=fake, ref_model=ref_model, ld_alpha=ld_alpha,
      precompute_ref_logps=ref_logits is None, f_divergence_type=f_div,
      f_alpha_divergence_coef=f_alpha, loss_types=loss_types, loss_weights=weights, beta=beta,
      label_smoothing=ls, use_weighting=use_weighting,
      args=types.SimpleNamespace(discopop_tau=tau, gradient_checkpointing_kwargs=None))
  inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(attn),
            "completion_mask": torch.tensor(comp)}
  if ref_logits is None:
    inputs.update(ref_chosen_logps=torch.tensor(ref_c), ref_rejected_logps=torch.tensor(ref_r))
  loss = t._compute_loss(fake, inputs, False)
  return float(loss), {k: v[-1] for k, v in t._metrics["train"].items()}


def _ours(batch, logits, ref_c, ref_r, **cfg):
  batch = dict(batch, ref_chosen_logps=jnp.asarray(ref_c), ref_rejected_logps=jnp.asarray(ref_r))
  ctx = lib.ctx(lib.FakeModel(), reference="precomputed", **cfg)
  (s, n), m = get("dpo")({"logits": jnp.asarray(logits)}, batch, None, ctx)
  return float(s / n), lib.finalize(m)


def _refs(seed=2, b=4):
  rs = np.random.RandomState(seed)
  return ((rs.randn(b) * 3 - 12).astype(np.float32), (rs.randn(b) * 3 - 12).astype(np.float32))


# label_smoothing where the loss reads it ('sigmoid' keeps ftjax's cDPO smoothing: tested apart).
_LS = {"robust": 0.1, "exo_pair": 1e-2, "aot": 0.1, "aot_unpaired": 0.05}


@pytest.mark.parametrize("loss_type", dpo_lib.LOSS_TYPES)
def test_dpo_loss_types_match_trl(loss_type):
  batch, (ids, attn, comp), logits = lib.paired_batch(seed=1)
  ref_c, ref_r = _refs()
  ls = _LS.get(loss_type, 0.0)
  want, want_m = _trl_dpo(logits, ids, attn, comp, ref_c, ref_r, [loss_type], [1.0], 0.1, ls,
                          tau=0.3)
  got, got_m = _ours(batch, logits, ref_c, ref_r, loss_type=loss_type, beta=0.1,
                     label_smoothing=ls, discopop_tau=0.3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
            "mean_token_accuracy"):
    np.testing.assert_allclose(got_m[k], want_m[k], rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("f_div, f_alpha", [
    ("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3),
    ("alpha_divergence", 1.0)])
@pytest.mark.parametrize("loss_type", dpo_lib.F_DIVERGENCE_LOSSES)
def test_f_divergences_match_trl(loss_type, f_div, f_alpha):
  batch, (ids, attn, comp), logits = lib.paired_batch(seed=8)
  # Reference = policy logps + N(0, 1): log-ratios of order 1 keep forward_kl's exp(-lr) and the
  # alpha-divergence's exp((α-1) lr) in a range where float32 rtol 1e-5 is fair.
  pol = np.asarray(dpo_lib.pref.sequence_stats(
      lib.FakeModel(), {"logits": jnp.asarray(logits)},
      dpo_lib.pref.concat_rows(batch, ("chosen_", "rejected_")))["logps"])
  rs = np.random.RandomState(10)
  ref_c, ref_r = pol[:4] - rs.randn(4).astype(np.float32), pol[4:] - rs.randn(4).astype(np.float32)
  ls = _LS.get(loss_type, 0.0)
  want, _ = _trl_dpo(logits, ids, attn, comp, ref_c, ref_r, [loss_type], [1.0], 0.5, ls,
                     f_div=f_div, f_alpha=f_alpha)
  got, got_m = _ours(batch, logits, ref_c, ref_r, loss_type=loss_type, beta=0.5,
                     label_smoothing=ls, f_divergence_type=f_div, f_alpha_divergence_coef=f_alpha)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_types, weights", [
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO, TRL's own example
    (["aot", "discopop", "ipo"], None),                 # default: every weight 1
    (["exo_pair", "sigmoid_norm", "sft", "sft"], [0.5, 2.0, 0.3, 0.7]),
])
def test_multi_loss_matches_trl(loss_types, weights):
  batch, (ids, attn, comp), logits = lib.paired_batch(seed=11)
  ref_c, ref_r = _refs(seed=12)
  ls = 0.02 if "exo_pair" in loss_types else 0.0
  want, _ = _trl_dpo(logits, ids, attn, comp, ref_c, ref_r, loss_types,
                     weights or [1.0] * len(loss_types), 0.2, ls)
  cfg = dict(loss_type=tuple(loss_types), beta=0.2, label_smoothing=ls)
  if weights is not None:
    cfg["loss_weights"] = tuple(weights)
  got, _ = _ours(batch, logits, ref_c, ref_r, **cfg)
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_aot_ignores_padding_rows(loss_type):
  """A final partial batch's padding rows (example_id -1) must not enter AOT's batch sort."""
  batch, _, logits = lib.paired_batch(seed=13, b=4)
  ref_c, ref_r = _refs(seed=14)
  keep = np.array([0, 2, 3])
  real = {k: v[keep] for k, v in batch.items()}
  full_logits = np.asarray(logits)
  got_real, _ = _ours(real, np.concatenate([full_logits[keep], full_logits[4 + keep]]),
                      ref_c[keep], ref_r[keep], loss_type=loss_type, beta=0.1)
  padded = dict(batch, example_id=jnp.asarray([0, -1, 2, 3]))
  got_pad, _ = _ours(padded, logits, ref_c, ref_r, loss_type=loss_type, beta=0.1)
  np.testing.assert_allclose(got_pad, got_real, rtol=1e-6)


_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "bco_pair", "discopop"])
def test_wpo_weighting_matches_trl(loss_type):
  batch, (ids, attn, comp), logits = lib.paired_batch(seed=15)
  ref_c, ref_r = _refs(seed=16)
  want, want_m = _trl_dpo(logits, ids, attn, comp, ref_c, ref_r, [loss_type], [1.0], 0.1, 0.0,
                          use_weighting=True)
  got, got_m = _ours(batch, logits, ref_c, ref_r, loss_type=loss_type, beta=0.1,
                     use_weighting=True)
  plain, _ = _ours(batch, logits, ref_c, ref_r, loss_type=loss_type, beta=0.1)
  assert abs(got - plain) > 1e-3 * abs(plain)  # the weights do something
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  for k in _METRICS:
    np.testing.assert_allclose(got_m[k], want_m[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("ld_alpha, loss_types", [
    (0.5, ["sigmoid"]), (0.0, ["ipo"]), (0.3, ["sigmoid", "sft"]), (1.0, ["hinge"])])
def test_ld_dpo_matches_trl(ld_alpha, loss_types):
  batch, (ids, attn, comp), logits = lib.paired_batch(seed=17)
  ref_c, ref_r = _refs(seed=18)
  want, want_m = _trl_dpo(logits, ids, attn, comp, ref_c, ref_r, loss_types,
                          [1.0] * len(loss_types), 0.1, 0.0, ld_alpha=ld_alpha)
  got, got_m = _ours(batch, logits, ref_c, ref_r, loss_type=tuple(loss_types), beta=0.1,
                     ld_alpha=ld_alpha)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for k in _METRICS:
    np.testing.assert_allclose(got_m[k], want_m[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_ld_dpo_reference_forward_matches_trl_and_cache():
  """LD weighting reaches the reference too: 'copy' vs TRL's reference model forward, and the
  precomputed cache (`precompute_reference(ld_alpha=...)`) vs 'copy'."""
  batch, (ids, attn, comp), logits = lib.paired_batch(seed=19)
  ref_logits = (np.random.RandomState(20).randn(*logits.shape) * 2).astype(np.float32)
  want, want_m = _trl_dpo(logits, ids, attn, comp, None, None, ["sigmoid"], [1.0], 0.1, 0.0,
                          ld_alpha=0.25, ref_logits=ref_logits)
  c = lib.ctx(lib.FakeModel(), reference="copy", beta=0.1, ld_alpha=0.25)
  c.ref_params = {"logits": jnp.asarray(ref_logits)}
  (s, n), m = get("dpo")({"logits": jnp.asarray(logits)}, batch, None, c)
  np.testing.assert_allclose(float(s / n), want, rtol=1e-5)
  np.testing.assert_allclose(lib.finalize(m)["rewards/margins"], want_m["rewards/margins"],
                             rtol=1e-5)
  host = {k: np.asarray(v) for k, v in batch.items()}
  host["example_id"] = np.arange(4)
  table = dpo_lib.pref.precompute_reference(lib.FakeModel(), c.ref_params, [host], ld_alpha=0.25)
  got, _ = _ours(batch, logits, table["ref_chosen_logps"], table["ref_rejected_logps"], beta=0.1,
                 ld_alpha=0.25)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_discopop_is_finite_for_large_margins():
  lr_c = jnp.asarray([-400.0, 0.0, 400.0])
  out = dpo_lib.dpo_losses("discopop", lr_c, -lr_c, beta=0.5, discopop_tau=0.05)
  assert np.isfinite(np.asarray(out)).all()


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
    (dict(loss_type="exo_pair"), "exo_pair"),
    (dict(loss_type=("sigmoid", "sft"), loss_weights=(1.0,)), "loss_weights"),
    (dict(loss_type=("sigmoid", "nope")), "sigmoid"),
    (dict(f_divergence_type="tv"), "reverse_kl"),
    (dict(loss_type="bco_pair", f_divergence_type="forward_kl"), "f_divergence_type"),
    (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau"),
    (dict(ld_alpha=1.5), "ld_alpha"),
    (dict(loss_type="aot", use_weighting=True), "use_weighting"),
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
