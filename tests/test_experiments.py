"""experiments/sweep.py: a 2-point grid trains twice and tabulates; re-running skips done points."""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_sweep_runs_grid_and_tabulates(tmp_path):
  cmd = [sys.executable, "experiments/sweep.py", "--config", "configs/sft_tiny.py:steps=2",
         "--workdir", str(tmp_path), "--grid", "optim.lr=1e-3,1e-2",
         "--grid", "model.hidden_size=32", "--grid", "model.intermediate_size=64",
         "--grid", "model.num_layers=1", "--grid", "eval.every=0",
         "--grid", "train.batch_size=4", "--grid", "train.seq_len=32",
         "--metrics", "train_loss,lr"]
  res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "host memory: glibc default" not in res.stdout  # re-executed with huge pages
  rows = json.load(open(os.path.join(tmp_path, "results.json")))
  assert [r["point"]["optim.lr"] for r in rows] == [1e-3, 1e-2]
  assert all(r["train_loss"] > 0 for r in rows)
  assert "| optim.lr=0.001" in open(os.path.join(tmp_path, "results.md")).read()
  bad = subprocess.run(cmd[:6] + ["--grid", "optim.learning_rate=1"], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0 and "optim.learning_rate" in bad.stderr
