"""Reward model: HF AutoModelForSequenceClassification parity (load and export) and the
Bradley–Terry loss vs TRL 1.16 `RewardTrainer.compute_loss`."""

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from trl.trainer.reward_trainer import RewardTrainer

import test_pref_lib as lib
from ftjax.models import hf_testing
from ftjax.models.reward import RewardModel, export_reward_hf, load_reward_hf
from ftjax.objectives import get

PAD = 0


def _padded(rs, n, t, vocab):
  ids = rs.randint(1, vocab, (n, t))
  mask = np.ones((n, t), np.int64)
  for i in range(n):
    mask[i, rs.randint(2, t + 1):] = 0
  return np.where(mask == 1, ids, PAD), mask


def _hf_scores(path, ids, mask):
  m = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
  m.eval()
  with torch.no_grad():
    out = m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  return out.logits[:, 0].numpy()


def _ours(cfg, params, ids, mask):
  fn = jax.jit(lambda p, t, pos, seg: RewardModel(cfg).apply(
      {"params": p}, t, positions=pos, segment_ids=seg))
  return np.asarray(fn(params, jnp.asarray(ids, jnp.int32),
                       jnp.asarray(hf_testing.positions_from_mask(mask)),
                       jnp.asarray(mask, jnp.int32)))


@pytest.fixture(scope="module")
def hf_reward_dir(tmp_path_factory):
  torch.manual_seed(0)
  conf = hf_testing.hf_config("llama", num_labels=1, pad_token_id=PAD)
  model = transformers.AutoModelForSequenceClassification.from_config(conf)
  path = str(tmp_path_factory.mktemp("rm") / "hf")
  model.save_pretrained(path)
  return path


def test_load_matches_transformers(hf_reward_dir):
  cfg, params = load_reward_hf(hf_reward_dir)
  ids, mask = _padded(np.random.RandomState(0), 4, 10, cfg.vocab_size)
  np.testing.assert_allclose(_ours(cfg, params, ids, mask), _hf_scores(hf_reward_dir, ids, mask),
                             atol=1e-4)


def test_export_roundtrip_same_scores(hf_reward_dir, tmp_path):
  cfg, _ = load_reward_hf(hf_reward_dir)
  import flax.linen as nn
  params = jax.jit(lambda r: nn.unbox(RewardModel(cfg).init(r, jnp.zeros((1, 4), jnp.int32))))(
      jax.random.key(3))["params"]
  assert params["score"]["kernel"].shape == (cfg.hidden_size, 1) and "lm_head" not in params
  out = export_reward_hf(params, cfg, str(tmp_path / "export"), pad_token_id=PAD)
  ids, mask = _padded(np.random.RandomState(1), 3, 9, cfg.vocab_size)
  np.testing.assert_allclose(_hf_scores(out, ids, mask), _ours(cfg, params, ids, mask), atol=1e-4)


@pytest.mark.parametrize("use_margin, center", [(True, 0.01)])
def test_bradley_terry_matches_trl(hf_reward_dir, use_margin, center):
  cfg, params = load_reward_hf(hf_reward_dir)
  rs = np.random.RandomState(2)
  ids, mask = _padded(rs, 6, 10, cfg.vocab_size)
  batch = {}
  batch.update(lib.jax_rows(ids[:3], mask[:3], mask[:3], "chosen_"))
  batch.update(lib.jax_rows(ids[3:], mask[3:], mask[3:], "rejected_"))
  for p in ("chosen_", "rejected_"):  # HF-style positions (padding is on the right anyway)
    batch[p + "positions"] = jnp.asarray(hf_testing.positions_from_mask(
        np.asarray(batch[p + "segment_ids"])))
  margin = rs.rand(3).astype(np.float32)
  if use_margin:
    batch["margin"] = jnp.asarray(margin)
  c = lib.ctx(lib.FakeModel(), center_rewards_coefficient=center)
  c.model = RewardModel(cfg)
  (s, n), m = jax.jit(lambda p, b: get("reward")(p, b, None, c))(params, batch)
  got, got_m = float(s / n), lib.finalize(m)

  rewards = torch.tensor(_ours(cfg, params, ids, mask))[:, None]
  fake = types.SimpleNamespace(training=True)
  t = lib.trainer_shell(RewardTrainer, model=fake,
                        args=types.SimpleNamespace(center_rewards_coefficient=center))
  t._metrics = {"train": collections.defaultdict(list)}
  inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
  if use_margin:
    inputs["margin"] = torch.tensor(margin)
  want = float(t.compute_loss(lambda **kw: types.SimpleNamespace(logits=rewards), inputs))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for k in ("accuracy", "margin"):
    np.testing.assert_allclose(got_m[k], t._metrics["train"][k][-1], rtol=1e-5, atol=1e-6)
