"""Runs a grid of config overrides and tabulates the final metrics (paper-style ablations).

  python experiments/sweep.py --config configs/sft_tiny.py:steps=200 --workdir runs/lr_sweep \
      --grid 'optim.lr=1e-3,3e-3,1e-2' --grid 'model.num_layers=2,4'

Each grid point trains in its own sub-workdir (resumable: re-running skips finished points) with
the one train loop; the table (markdown + results.json) lists every point's final train loss and
eval metrics. Values are parsed as Python literals (numbers, booleans, tuples) or kept as strings.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import os

from ftjax import hostmem
from ftjax.config import load_config


def _parse(v: str):
  try:
    return ast.literal_eval(v)
  except (ValueError, SyntaxError):
    return v


def _set(config, dotted: str, value):
  node = config
  *path, leaf = dotted.split(".")
  for p in path:
    node = node[p]
  if leaf not in node:
    raise ValueError(f"--grid {dotted}: unknown config key")
  node[leaf] = value


def grid_points(grids):
  axes = []
  for g in grids:
    key, _, values = g.partition("=")
    axes.append([(key, _parse(v)) for v in values.split(",")])
  return [dict(p) for p in itertools.product(*axes)]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", required=True)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--grid", action="append", default=[])
  ap.add_argument("--metrics", default="train_loss,eval_loss,eval_exact_match")
  args = ap.parse_args()
  hostmem.reexec_tuned()  # as `ftjax train` does: huge pages for XLA:CPU's step buffers
  from ftjax import train  # pylint: disable=g-import-not-at-top
  rows = []
  for point in grid_points(args.grid):
    config = load_config(args.config)
    for k, v in point.items():
      _set(config, k, v)
    name = ",".join(f"{k}={v}" for k, v in point.items()) or "base"
    wd = os.path.join(args.workdir, name.replace("/", "_"))
    summary_path = os.path.join(wd, "summary.json")
    if not os.path.exists(summary_path):
      train.run(config, wd)
    with open(summary_path) as f:
      last = json.load(f).get("last", {})
    rows.append({"point": point, **{m: last.get(m) for m in args.metrics.split(",")}})
  cols = args.metrics.split(",")
  lines = ["| " + " | ".join(["point"] + cols) + " |", "|" + "---|" * (len(cols) + 1)]
  for r in rows:
    cells = [", ".join(f"{k}={v}" for k, v in r["point"].items())]
    cells += ["-" if r[c] is None else f"{r[c]:.4g}" for c in cols]
    lines.append("| " + " | ".join(cells) + " |")
  table = "\n".join(lines)
  print(table)
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(rows, f, indent=2)
  with open(os.path.join(args.workdir, "results.md"), "w") as f:
    f.write(table + "\n")


if __name__ == "__main__":
  main()
