"""LoRA on MoE: per-expert adapters on the stacked expert weights and on the router, selected
by target_modules patterns; identity at init, merge folds them exactly."""

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from ftjax import peft
from ftjax.models import Decoder, ModelConfig


def test_lora_on_experts_and_router_merges_exactly():
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                    num_heads=4, num_kv_heads=2, num_experts=4, num_experts_per_tok=2,
                    moe_intermediate_size=16)
  tok = jax.random.randint(jax.random.key(0), (2, 8), 1, 64)
  base = jax.jit(lambda: nn.unbox(Decoder(cfg).init(jax.random.key(1), tok)["params"]))()
  pc = ml_collections.ConfigDict(dict(method="lora", r=2, alpha=4.0,
                                      target_modules=["gate", "gate_proj", "down_proj"]))
  full = peft.apply_peft(cfg, pc)
  params = peft.init_adapters(base, Decoder(full), jax.random.key(2), tok)
  mlp = params["layers"]["mlp"]
  assert mlp["experts"]["gate_proj"]["lora_A"].shape == (1, 4, 32, 2)  # [L, E, in, r]
  assert mlp["experts"]["down_proj"]["lora_B"].shape == (1, 4, 2, 32)
  assert "lora_A" not in mlp["experts"]["up_proj"]  # not targeted
  assert mlp["gate"]["lora_A"].shape == (1, 32, 2)  # the router, a Linear
  fwd = jax.jit(lambda p, c: Decoder(c).apply({"params": p}, tok), static_argnums=1)
  np.testing.assert_allclose(fwd(params, full), fwd(base, cfg), atol=1e-5)  # B = 0 at init
  # Non-zero adapters change the output, and merging reproduces it with plain weights.
  leaves = jax.tree_util.tree_leaves_with_path(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.3 * jax.random.normal(
          keys[[str(q) for q, _ in leaves].index(str(p))], x.shape)
      if str(p[-1].key) == "lora_B" else x, params)
  adapted = fwd(params, full)
  assert not np.allclose(adapted, fwd(base, cfg), atol=1e-3)
  merged, merged_cfg = peft.merge(params, full)
  assert merged_cfg.peft is None and "lora_A" not in merged["layers"]["mlp"]["experts"]["gate_proj"]
  np.testing.assert_allclose(fwd(merged, merged_cfg), adapted, atol=1e-4)
  mask = peft.trainable_mask(params, pc)
  assert mask["layers"]["mlp"]["experts"]["gate_proj"]["lora_A"]
  assert not mask["layers"]["mlp"]["experts"]["gate_proj"]["kernel"]
  # PEFT has no adapter format for stacked expert / router LoRA here: one clear error.
  import pytest  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="export a merged model"):
    peft.export_adapter(params, full, "/nonexistent/never_written")
