"""Sparse upcycling: dense logits preserved at init (both dispatch paths), HF dir -> Mixtral dir
through the CLI (transformers agrees), bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.models import Decoder, ModelConfig
from ftjax.upcycle import upcycle_config, upcycle_params


def test_upcycled_logits_equal_dense_logits():
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                    num_heads=4, num_kv_heads=2)
  tok = jax.random.randint(jax.random.key(0), (2, 12), 1, 64)
  seg = jnp.ones_like(tok).at[1, 9:].set(0)
  params = jax.jit(lambda: nn.unbox(Decoder(cfg).init(jax.random.key(1), tok)["params"]))()
  dense = Decoder(cfg).apply({"params": params}, tok, segment_ids=seg)
  moe_params, moe_cfg = upcycle_params(params, cfg, num_experts=4, top_k=2, router_std=1.0)
  assert moe_cfg.family == "mixtral" and moe_cfg.moe_norm_topk_prob
  assert moe_params["layers"]["mlp"]["experts"]["gate_proj"]["kernel"].shape == (1, 4, 32, 48)
  valid = np.asarray(seg, bool)
  for dispatch in ("dropless", "capacity"):
    c = moe_cfg.replace(moe_dispatch=dispatch, moe_capacity_factor=2.0)
    out = jax.jit(lambda p: Decoder(c).apply({"params": p}, tok, segment_ids=seg))(moe_params)
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(dense)[valid], atol=1e-5)


def test_bad_upcycle_input():
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1)
  with pytest.raises(ValueError, match="top_k"):
    upcycle_config(cfg, num_experts=2, top_k=3)
  with pytest.raises(ValueError, match="already an MoE"):
    upcycle_config(cfg.replace(num_experts=4), num_experts=4, top_k=2)
  with pytest.raises(ValueError, match="does not preserve"):
    upcycle_config(cfg, num_experts=4, top_k=2, moe_router="sigmoid_bias")


def test_cli_upcycle_hf_llama_to_mixtral(tmp_path, capsys):
  pytest.importorskip("torch")
  from ftjax import cli
  from ftjax.models import hf, hf_testing as ht
  src = ht.save_tiny("llama", tmp_path / "dense")
  out = str(tmp_path / "moe")
  rc = cli.main(["ftjax", "upcycle", "--src", src, "--out", out, "--num_experts", "4",
                 "--top_k", "2"])
  assert rc == 0, capsys.readouterr().err
  tok, mask = ht.padding_batch(128)
  dense = ht.hf_logits(src, tok, mask)
  upcycled = ht.hf_logits(out, tok, mask)  # transformers' MixtralForCausalLM
  assert np.abs((dense - upcycled) * mask[..., None]).max() <= 1e-4
  cfg, params = hf.load_hf(out)
  assert cfg.family == "mixtral" and cfg.num_experts == 4
  ours = ht.ftjax_logits(cfg, params, tok, mask)
  assert np.abs((dense - ours) * mask[..., None]).max() <= 1e-4
  rc = cli.main(["ftjax", "upcycle", "--src", src, "--out", out, "--num_experts", "2",
                 "--top_k", "3"])
  assert rc == 1 and "top_k" in capsys.readouterr().err
