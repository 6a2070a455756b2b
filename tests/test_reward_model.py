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


@pytest.fixture(scope="module", params=["none", "lora"])
def reward_run(request, tmp_path_factory):
  """A 2-step reward run of configs/reward_tiny.py on a tiny model (random init), full FT or LoRA
  on all-linear (the score head is left out of all-linear and trains in full, as PEFT SEQ_CLS)."""
  from ftjax import train
  from ftjax.config import load_config
  from ftjax.peft.configs import default_config
  c = load_config("reward_tiny:steps=2,sft=")
  if request.param != "none":
    c.peft = default_config(request.param, r=4, alpha=8.0, target_modules="all-linear")
  c.model.update(dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2))
  c.train.update(dict(batch_size=8, log_every=1))
  c.eval.update(dict(every=0))
  c.checkpoint.update(dict(async_save=False, every=1, keep=2))
  c.data.train = c.data.eval  # the small held-out split: a short first pass
  wd = str(tmp_path_factory.mktemp("reward_run") / "run")
  train.run(c, wd)
  return wd


def test_cli_export_of_a_reward_run_loads_in_transformers(reward_run, tmp_path):
  from ftjax import cli
  from ftjax.export import load_run
  out = str(tmp_path / "hf")
  assert cli.main(["ftjax", "export", f"--workdir={reward_run}", f"--out={out}"]) == 0
  conf = transformers.AutoConfig.from_pretrained(out)
  assert conf.num_labels == 1 and conf.architectures[0].endswith("ForSequenceClassification")
  _, cfg, params, tok = load_run(reward_run)
  assert conf.pad_token_id == tok.pad_token_id == PAD != tok.eos_token_id
  ids, mask = _padded(np.random.RandomState(4), 4, 12, cfg.vocab_size)
  ids[np.arange(4), mask.sum(1) - 1] = tok.eos_token_id  # sequences end in eos, as in training
  ours = _ours(cfg.replace(head="reward"), params, ids, mask)
  np.testing.assert_allclose(_hf_scores(out, ids, mask), ours, atol=1e-4)
  assert np.ptp(ours) > 0  # scores differ per sequence, so the read position matters


def _run_params(workdir, step):
  from ftjax.train.checkpoint import Checkpointer
  import ml_collections
  ck = Checkpointer(f"{workdir}/checkpoints", ml_collections.ConfigDict({"async_save": False}))
  trainable, frozen, _ = ck.restore_params(step)
  ck.close()
  return trainable, frozen


def test_score_head_trains_under_lora(reward_run):
  from ftjax.export import load_run
  config, cfg, _, _ = load_run(reward_run)
  (t1, f1), (t2, _) = _run_params(reward_run, 1), _run_params(reward_run, 2)
  assert "score" in t1 and "score" not in f1  # trainable in both modes
  assert not np.allclose(t1["score"]["kernel"], t2["score"]["kernel"])
  if config.peft.method != "none":
    assert "lora_A" in t1["layers"]["mlp"]["down_proj"] and "kernel" not in t1["layers"]["mlp"]
    assert "score" not in str(config.peft.target_modules)


def test_cli_export_adapter_of_a_reward_run(reward_run, tmp_path, capsys):
  """--adapter: a PEFT SEQ_CLS adapter (score in modules_to_save) that PeftModel loads on the
  base AutoModelForSequenceClassification with ftjax's scores, and ftjax loads back."""
  import json
  import peft as hf_peft
  from ftjax import cli, peft
  from ftjax.export import load_run
  out = tmp_path / "adapter"
  rc = cli.main(["ftjax", "export", f"--workdir={reward_run}", f"--out={out}", "--adapter"])
  config, cfg, params, tok = load_run(reward_run)
  if config.peft.method == "none":
    assert rc == 1 and "no LoRA/DoRA adapter" in capsys.readouterr().err
    return
  assert rc == 0
  acfg = json.loads((out / "adapter_config.json").read_text())
  assert acfg["task_type"] == "SEQ_CLS" and acfg["modules_to_save"] == ["score"]
  # The base model: frozen weights with a different (zero) score, so only the adapter's can match.
  base = _strip_adapters(params)
  base["score"] = {"kernel": np.zeros_like(params["score"]["kernel"])}
  base_cfg = cfg.replace(peft=None, head="reward")
  base_dir = export_reward_hf(base, base_cfg, str(tmp_path / "base"), pad_token_id=tok.pad_token_id)
  ids, mask = _padded(np.random.RandomState(5), 4, 12, cfg.vocab_size)
  ids[np.arange(4), mask.sum(1) - 1] = tok.eos_token_id
  ours = _ours(cfg.replace(head="reward"), params, ids, mask)
  hf_base = transformers.AutoModelForSequenceClassification.from_pretrained(
      base_dir, dtype=torch.float32)
  model = hf_peft.PeftModel.from_pretrained(hf_base, str(out))
  model.eval()
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0]
  np.testing.assert_allclose(theirs.numpy(), ours, atol=1e-4)
  back, back_cfg = peft.load_adapter(str(out), base, base_cfg)
  np.testing.assert_allclose(_ours(back_cfg, back, ids, mask), ours, atol=1e-5)


def _strip_adapters(tree):
  if not isinstance(tree, dict):
    return np.asarray(tree)
  return {k: _strip_adapters(v) for k, v in tree.items()
          if k not in ("lora_A", "lora_B", "lora_magnitude")}
