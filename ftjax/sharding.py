"""Mesh from config and logical-axis rules -> NamedShardings for any pytree.

Sharding is data, not code: layers name their axes ('embed', 'mlp', 'heads', ...), and
`config.sharding.rules` maps each logical name to mesh axes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Default rules: batch over data-like axes, weights FSDP over 'fsdp', Megatron-style tensor
# parallelism over 'tensor', experts over 'expert'. Activations are named act_* so that they can
# be sharded differently from the weights they come from.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("expert", "expert"),
    ("lora_rank", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(mesh_cfg: Sequence[Any], devices=None) -> Mesh:
  """Mesh from [(axis, size), ...] with at most one -1 ("the rest"). Missing axes get size 1."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  sizes = dict((str(a), int(s)) for a, s in mesh_cfg)
  for name in sizes:
    if name not in MESH_AXES:
      raise ValueError(f"config.mesh: unknown axis {name!r} (known: {MESH_AXES})")
  n = devices.size
  rest = [a for a, s in sizes.items() if s == -1]
  if len(rest) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {rest}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if fixed <= 0 or n % fixed:
    raise ValueError(f"config.mesh: axes {sizes} do not divide the device count {n}")
  if rest:
    sizes[rest[0]] = n // fixed
  elif fixed != n:
    raise ValueError(f"config.mesh: axes {sizes} use {fixed} devices but {n} are present "
                     "(set one axis to -1 to take the rest)")
  shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
  try:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    dev = mesh_utils.create_device_mesh(shape, devices=list(devices.flat))
  except Exception:  # pylint: disable=broad-except  # CPU / odd topologies
    dev = devices.reshape(shape)
  return Mesh(dev, MESH_AXES)


@contextlib.contextmanager
def mesh_rules(mesh: Mesh, rules):
  """The mesh (for bare PartitionSpec constraints) and the logical axis rules, as one context.

  `jax.set_mesh` where it exists: `with mesh:` is deprecated since JAX 0.10.
  """
  use_mesh = getattr(jax, "set_mesh", None)
  with (use_mesh(mesh) if use_mesh is not None else mesh), nn.logical_axis_rules(rules):
    yield


def rules_from_config(rules) -> tuple:
  """config.sharding.rules as a tuple of (logical, mesh axes) pairs; defaults when empty."""
  if not rules:
    return DEFAULT_RULES
  out = []
  for name, axes in rules:
    if isinstance(axes, list):
      axes = tuple(axes)
    out.append((name, axes))
  return tuple(out)


def logical_shardings(abstract_tree, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of (boxed) abstract arrays carrying logical axis names."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def data_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of [batch, length] arrays: batch over every data-parallel mesh axis."""
  spec = nn.logical_to_mesh_axes(("batch", "length"), rules)
  return NamedSharding(mesh, spec)


def data_parallel_size(mesh: Mesh, rules) -> int:
  spec = nn.logical_to_mesh_axes(("batch",), rules)[0]
  if spec is None:
    return 1
  axes = (spec,) if isinstance(spec, str) else spec
  return math.prod(mesh.shape[a] for a in axes)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
