"""Bad input through the CLI: one clear line naming the key/file, non-zero exit, nothing lost."""

import os
import subprocess
import sys

from conftest import REPO
from test_train import TINY


def _ftjax(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", "ftjax", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _train(workdir, *extra):
  return _ftjax("train", f"--config={REPO}/configs/sft_tiny.py:steps=4",
                f"--workdir={workdir}", *TINY, *extra)


def _last_line(res):
  return res.stderr.strip().splitlines()[-1]


def test_unknown_config_key(tmp_path):
  res = _train(tmp_path, "--config.optim.learning_rate=1e-3")
  assert res.returncode == 2
  assert "learning_rate" in _last_line(res)


def test_mesh_must_divide_devices(tmp_path):
  res = _train(tmp_path, "--config.mesh=(('data', 3),)")
  assert res.returncode == 1
  assert _last_line(res).startswith("ftjax: error: config.mesh")


def test_batch_must_divide_data_parallel_and_accumulation(tmp_path):
  res = _train(tmp_path, "--config.train.grad_accum_steps=3")
  assert res.returncode == 1
  assert "config.train.batch_size=8" in _last_line(res)


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  res = _train(blocker / "sub")
  assert res.returncode == 1
  assert "--workdir" in _last_line(res)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  res = _train(tmp_path, "--config.optim.lr=1e30", "--config.optim.grad_clip_norm=0",
               "--config.optim.warmup_steps=0", "--config.checkpoint.every=1")
  assert res.returncode == 1, res.stderr[-2000:]
  line = _last_line(res)
  assert "non-finite" in line and "at step" in line
  kept = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert kept and max(kept) < 4
