"""Metric writers: metrics.jsonl, TensorBoard events, loss-curve PNG."""

from __future__ import annotations

import json
import os
from typing import Dict


class MetricWriter:
  """Writes one JSON object per logged step (with 'step') and TensorBoard scalars (process 0)."""

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    if os.path.exists(self.path):  # resume: drop lines logged after the restored checkpoint
      with open(self.path) as f:
        keep = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(keep)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: Dict[str, float]):
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **metrics}) + "\n")
    for k, v in metrics.items():
      self._tb.add_scalar(k, v, step)

  def close(self):
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


def read_metrics(workdir: str):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]


def plot_loss_curve(workdir: str, out_name: str = "loss_curve.png"):
  """Train (and eval) loss vs step from metrics.jsonl, saved next to it."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = read_metrics(workdir)
  fig, ax = plt.subplots(figsize=(6, 4))
  for key in ("train_loss", "eval_loss"):
    pts = [(r["step"], r[key]) for r in rows if key in r]
    if pts:
      ax.plot(*zip(*pts), label=key, marker="." if key == "eval_loss" else None)
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_yscale("log")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(workdir, out_name)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
