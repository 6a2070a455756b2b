"""configs/sft_hf.py on a tiny random-weight HF dir: train, export, reload in transformers."""

import os

import numpy as np

from conftest import REPO


def test_train_from_hf_export_reload(tmp_path):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from ftjax import train  # pylint: disable=g-import-not-at-top
  from ftjax.data import testing as dt  # pylint: disable=g-import-not-at-top
  from ftjax.export import export_workdir, load_run  # pylint: disable=g-import-not-at-top
  from ftjax.models import hf_testing as ht  # pylint: disable=g-import-not-at-top

  src = str(tmp_path / "src")
  dt.make_tokenizer(src)  # char-level tokenizer with a chat template, in the model dir
  ht.save_tiny("qwen2", src, max_position_embeddings=128)
  argv = ["x", f"--config={REPO}/configs/sft_hf.py:path={src},steps=3",
          "--config.train.batch_size=4", "--config.train.seq_len=32",
          "--config.train.log_every=1", "--config.optim.lr=3e-3", "--config.eval.every=0",
          "--config.checkpoint.every=3", "--config.checkpoint.async_save=False"]
  fv = flags.FlagValues()
  # sys_argv: config_flags finds --config.* overrides there, not in the list given to fv().
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  wd = str(tmp_path / "run")
  train.run(fv.config, wd)

  out = export_workdir(wd, str(tmp_path / "hf"))
  assert os.path.exists(os.path.join(out, "tokenizer.json"))
  _, cfg, params, _ = load_run(wd)
  tokens, mask = ht.padding_batch(cfg.vocab_size, batch=2, length=16)
  ours = ht.ftjax_logits(cfg, params, tokens, mask)
  theirs = ht.hf_logits(out, tokens, mask)
  before = ht.hf_logits(src, tokens, mask)
  real = mask.astype(bool)
  assert np.abs(theirs - ours)[real].max() <= 1e-4  # the export is the trained model
  assert np.abs(theirs - before)[real].max() > 1e-3  # and training changed it
