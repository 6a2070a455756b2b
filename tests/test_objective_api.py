"""The objective API: a new preference loss defined HERE (not in ftjax) trains through the one
train loop, selected by name from the config. This is the README's "add your own loss" example."""

import json
import os

import jax
import ml_collections
import numpy as np

from ftjax.objectives import preference as pref
from ftjax.objectives import register


# --- README example starts ---------------------------------------------------------------------
@register("dpo_margin")  # select with config.objective.name = "dpo_margin"
def dpo_margin(params, batch, rng, ctx):
  """DPO with a target margin m: -log σ(β (Δ_policy - Δ_reference) - m)."""
  beta, m = pref.get_beta(ctx.config), float(ctx.config.get("margin", 1.0))
  pol, ref = pref.paired_forward(params, batch, ctx)  # ONE forward of [chosen; rejected]
  lr_c, lr_r = pref.halves(pol["logps"] - ref)  # per-pair log-ratios [B]
  losses = -jax.nn.log_sigmoid(beta * (lr_c - lr_r) - m)
  w = pref.row_weights(batch, losses.shape[0])  # 0 for padding rows
  metrics = pref.pair_metrics(pol, beta * lr_c, beta * lr_r, w=w)  # TRL-named metrics
  return ((w * losses).sum(), w.sum()), metrics  # (loss sum, denominator), {name: (sum, count)}
# --- README example ends -----------------------------------------------------------------------


def test_toy_loss_trains_through_the_loop(tmp_path):
  from ftjax import train
  from ftjax.config import load_config
  c = load_config("dpo_tiny:steps=4,sft=,lr=0.01")
  c.model.update(dict(hidden_size=32, intermediate_size=64, num_layers=1))
  c.train.update(dict(batch_size=8, log_every=1))
  c.eval.update(dict(every=0))
  c.checkpoint.async_save = False
  c.data.train = c.data.eval  # 500 pairs: a short reference precompute pass
  # reference log-probs precomputed once by the loop and cached in the workdir
  c.objective = ml_collections.ConfigDict(dict(name="dpo_margin", beta=0.5, margin=1.0,
                                               reference="precomputed"))
  wd = str(tmp_path / "run")
  train.run(c, wd)
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f if l.strip()]
  losses = [r["train_loss"] for r in rows if "train_loss" in r]
  assert len(losses) == 4 and all(np.isfinite(losses))
  assert os.path.exists(os.path.join(wd, "reference_logps_train.npz"))
  # step 1: policy == (cached) reference, so the loss is -log σ(-m) exactly
  np.testing.assert_allclose(losses[0], -np.log(1 / (1 + np.exp(1.0))), rtol=1e-5)
  assert losses[-1] < losses[0]
  assert "rewards/accuracies" in rows[-1]


def test_shipped_preference_configs_resolve():
  from ftjax import objectives
  from ftjax.config import load_config
  from ftjax.models import from_config_dict
  kinds = {"dpo": "preference", "simpo": "preference", "orpo": "preference", "kto": "kto",
           "reward": "preference"}
  for name, kind in kinds.items():
    c = load_config(f"{name}_tiny")
    assert objectives.get(c.objective.name) and c.data.kind == kind and c.init_from
    assert from_config_dict(c.model).head == ("reward" if name == "reward" else "lm")
