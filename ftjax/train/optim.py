"""Optax optimizer and learning-rate schedule from `config.optim`."""

from __future__ import annotations

import re

import jax
import optax


def schedule(cfg, total_steps: int):
  """Linear warmup then cosine / linear / constant decay to `lr * final_lr_frac`."""
  lr = float(cfg.lr)
  warmup = int(cfg.get("warmup_steps", 0))
  final = lr * float(cfg.get("final_lr_frac", 0.0))
  decay_steps = max(total_steps - warmup, 1)
  kind = cfg.get("schedule", "cosine")
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=final / lr if lr else 0.0)
  elif kind == "linear":
    decay = optax.linear_schedule(lr, final, decay_steps)
  elif kind == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise ValueError(f"config.optim.schedule: unknown schedule {kind!r} "
                     "(cosine | linear | constant)")
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(params, patterns):
  """True where weight decay applies: leaves whose '/'-joined path matches none of `patterns`."""
  compiled = [re.compile(p) for p in patterns]

  def keep(path, _):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return not any(c.search(name) for c in compiled)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg, total_steps: int):
  """Returns (optax transform, lr schedule). cfg = config.optim."""
  sched = schedule(cfg, total_steps)
  name = cfg.get("name", "adamw")
  wd = float(cfg.get("weight_decay", 0.0))
  no_decay = tuple(cfg.get("no_decay", (r"norm", r"bias", r"embed")))
  mask = (lambda p: decay_mask(p, no_decay)) if wd else None
  if name == "adamw":
    tx = optax.adamw(sched, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                     eps=cfg.get("eps", 1e-8), weight_decay=wd, mask=mask)
  elif name == "adafactor":
    tx = optax.adafactor(sched, weight_decay_rate=wd or None, weight_decay_mask=mask)
  elif name == "sgd":
    tx = optax.sgd(sched, momentum=cfg.get("momentum", 0.9) or None)
    if wd:
      tx = optax.chain(optax.add_decayed_weights(wd, mask), tx)
  elif name == "lion":
    tx = optax.lion(sched, weight_decay=wd, mask=mask)
  else:
    raise ValueError(f"config.optim.name: unknown optimizer {name!r} "
                     "(adamw | adafactor | sgd | lion)")
  clip = cfg.get("grad_clip_norm", 0.0)
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(float(clip)), tx)
  return tx, sched
