"""Parameter-efficient fine-tuning as transforms of the Linear layer and of the param pytree.

`adapt_linear` is the hook `ftjax.models.layers.Linear` calls: without an adapter it is a plain
matmul; LoRA / DoRA / NF4 variants extend it (see the modules of this package).
"""

import jax
import jax.numpy as jnp


def adapt_linear(module, x: jax.Array, in_features: int, out_features: int, dtype) -> jax.Array:
  """Plain y = x @ W + b in the compute dtype (the no-adapter path)."""
  kernel, bias = module.base_params(in_features)
  y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
  if bias is not None:
    y = y + bias.astype(dtype)
  return y
