"""Objectives: pure functions selected by name from `config.objective.name`.

An objective is `fn(params, batch, rng, ctx) -> ((loss_sum, denom), metrics)` where
- `params` is the (trainable + frozen) param pytree the model applies,
- `batch` is a dict of arrays from the data pipeline (see ftjax/data),
- `ctx` is an `ObjectiveContext` (model, objective config, reference params when needed),
- `loss_sum / denom` is the loss; keeping the pair lets gradient accumulation and multi-host
  reductions stay exact token-weighted means,
- `metrics` maps names to `(sum, count)` pairs (reported as sum/count after reduction).

Register with `@register("name")`; a new loss is one small file, no trainer edits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional

_REGISTRY: Dict[str, Callable] = {}


def register(name: str):
  def deco(fn):
    _REGISTRY[name] = fn
    return fn
  return deco


def get(name: str) -> Callable:
  _import_builtin()
  if name not in _REGISTRY:
    raise ValueError(f"config.objective.name: unknown objective {name!r} "
                     f"(registered: {sorted(_REGISTRY)})")
  return _REGISTRY[name]


def names():
  _import_builtin()
  return sorted(_REGISTRY)


@dataclasses.dataclass
class ObjectiveContext:
  model: Any  # ftjax.models.Decoder (linen module, stateless)
  config: Any  # config.objective (ConfigDict)
  ref_params: Optional[Any] = None  # frozen reference, when the objective needs one
  train: bool = True


def _import_builtin():
  # Built-in objectives register themselves on import.
  from ftjax.objectives import sft  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  try:
    from ftjax.objectives import preference  # noqa: F401  pylint: disable=g-import-not-at-top
  except ImportError:
    pass
