"""Orbax checkpoints: train state, frozen params, data-iterator state and run metadata.

Saves are async and atomic (orbax writes to a temporary directory and renames it when complete,
so a half-written checkpoint is never listed). The train loop never saves a non-finite state.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with ftjax's fixed item layout."""

  def __init__(self, directory: str, cfg):
    directory = os.path.abspath(directory)
    best = cfg.get("best_metric")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(cfg.get("keep", 3)),
        enable_async_checkpointing=bool(cfg.get("async_save", True)),
        best_fn=(lambda m: m[best]) if best else None,
        best_mode=cfg.get("best_mode", "min"),
        keep_checkpoints_without_metrics=True,
        create=True,
    )
    self.manager = ocp.CheckpointManager(directory, options=options)
    self._best = best

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, frozen, data_state, meta: dict, metrics=None, force=False):
    if metrics is not None and self._best and self._best not in metrics:
      metrics = None
    items = dict(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                 meta=ocp.args.JsonSave(dict(meta, has_frozen=_nonempty(frozen))))
    if _nonempty(frozen):  # orbax refuses empty trees; full fine-tuning has nothing frozen
      items["frozen"] = ocp.args.StandardSave(frozen)
    args = ocp.args.Composite(**items)
    return self.manager.save(step, args=args, metrics=metrics, force=force)

  def restore(self, step: int, abstract_state, abstract_frozen):
    """Restores onto the shardings carried by the abstract (ShapeDtypeStruct) trees."""
    items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                 meta=ocp.args.JsonRestore())
    if _nonempty(abstract_frozen):
      items["frozen"] = ocp.args.StandardRestore(abstract_frozen)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"], out.get("frozen", {}), out["data"], out["meta"]

  def restore_params(self, step: Optional[int] = None):
    """Params only (trainable merged with frozen), as host arrays: for init_from / export."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    meta = meta["meta"]
    items = dict(state=ocp.args.StandardRestore())
    if meta.get("has_frozen"):
      items["frozen"] = ocp.args.StandardRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"]["params"], out.get("frozen", {}), meta

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _nonempty(tree) -> bool:
  return bool(jax.tree_util.tree_leaves(tree))


def abstract(tree):
  """ShapeDtypeStructs with shardings for a tree of jax.Arrays (restore targets)."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
