"""Logit parity with transformers for every family: float32 (<= 1e-4), bf16, padding, windows."""

import json
import os

import numpy as np
import pytest

from ftjax.models import hf
from ftjax.models import hf_testing as ht

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2"]


def _check(cfg, params, path, tokens, mask, tol=1e-4):
  ref = ht.hf_logits(path, tokens, mask)
  got = ht.ftjax_logits(cfg, params, tokens, mask)
  err = np.abs(ref - got)[mask.astype(bool)].max()  # padded positions are undefined in both
  assert err <= tol, f"{cfg.family}: max abs logit diff {err}"


BF16 = ("llama", "gemma2", "gpt2")  # bf16 compiles cost time; these cover every norm/act kind


@pytest.mark.parametrize("family", FAMILIES)
def test_family_parity(family, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  path = ht.save_tiny(family, tmp_path / family)
  cfg, params = hf.load_hf(path)
  assert cfg.family == family
  # Rows: full, right-padded, left-padded. Length 12 > the sliding window (4) of mistral/gemma2.
  tokens, mask = ht.padding_batch(cfg.vocab_size, batch=3, length=12)
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  ref = ht.hf_logits(path, tokens, mask, model=model)
  got = ht.ftjax_logits(cfg, params, tokens, mask)
  real = mask.astype(bool)  # padded positions are undefined in both
  assert np.abs(ref - got)[real].max() <= 1e-4, np.abs(ref - got)[real].max()
  assert np.abs(ref).max() > 1.0  # logits are not trivially small
  if cfg.sliding_window:  # the window really changes the reference at this length
    full = transformers.AutoModelForCausalLM.from_pretrained(path, sliding_window=10_000)
    assert np.abs(ht.hf_logits(path, tokens, mask, model=full) - ref)[real].max() > 1e-3
  if family in BF16:
    # bf16 compute (f32 master weights) is no worse than transformers' own bf16 model.
    cfg16, params16 = hf.load_hf(path, dtype="bfloat16")
    got16 = ht.ftjax_logits(cfg16, params16, tokens, mask)
    ref16 = ht.hf_logits(path, tokens, mask, model=model.to(torch.bfloat16))
    err, hf_err = np.abs(got16 - ref)[real].max(), np.abs(ref16 - ref)[real].max()
    assert err <= max(2 * hf_err, 0.02), (err, hf_err)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8},
])
def test_llama_rope_scaling(scaling, tmp_path):
  # max_position_embeddings 16 < 24 tokens: dynamic NTK actually rescales.
  path = ht.save_tiny("llama", tmp_path / "l", max_position_embeddings=16,
                      rope_parameters=dict(scaling, rope_theta=500.0))
  cfg, params = hf.load_hf(path)
  assert dict(cfg.rope_scaling)["rope_type"] == scaling["rope_type"]
  tokens, mask = ht.padding_batch(cfg.vocab_size, batch=3, length=24)
  _check(cfg, params, path, tokens, mask)


def test_v4_config_spelling(tmp_path):
  """transformers v4 wrote rope_theta at top level and rope_scaling with 'type'."""
  path = ht.save_tiny("llama", tmp_path / "l", rope_parameters={
      "rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})
  with open(os.path.join(path, "config.json")) as f:
    d = json.load(f)
  v5 = hf.config_from_hf(d)
  d.pop("rope_parameters")
  d.update(rope_theta=500.0, rope_scaling={"type": "linear", "factor": 2.0})
  assert hf.config_from_hf(d) == v5
  assert v5.rope_theta == 500.0 and dict(v5.rope_scaling) == {"rope_type": "linear", "factor": 2.0}


def test_gemma_v4_configs():
  d = dict(ht.TINY["gemma"], model_type="gemma", hidden_act="gelu")  # v4 legacy value
  cfg = hf.config_from_hf(d)
  assert cfg.mlp_activation == "gelu_pytorch_tanh" and cfg.tie_embeddings and cfg.embed_scale
  # v4 Gemma 2 configs have no layer_types: sliding on even layers, HF default caps.
  cfg = hf.config_from_hf(dict(ht.TINY["llama"], model_type="gemma2", sliding_window=8))
  assert (cfg.sliding_window, cfg.sliding_window_pattern) == (8, 2)
  assert (cfg.attn_logit_softcap, cfg.final_logit_softcap, cfg.query_pre_attn_scalar) == (
      50.0, 30.0, 256)


def test_qwen2_sliding_layers_and_unsupported(tmp_path):
  base = dict(ht.TINY["qwen2"], model_type="qwen2")
  assert hf.config_from_hf(dict(base, sliding_window=8, use_sliding_window=False)).sliding_window \
      is None
  cfg = hf.config_from_hf(dict(base, sliding_window=8, use_sliding_window=True,
                               max_window_layers=0))
  assert cfg.sliding_window == 8 and cfg.sliding_window_pattern == 1
  with pytest.raises(ValueError, match="layer_types"):
    hf.config_from_hf(dict(base, sliding_window=8, use_sliding_window=True,
                           layer_types=["full_attention", "sliding_attention"]))
  with pytest.raises(ValueError, match="rope type 'yarn'"):
    hf.config_from_hf(dict(base, rope_parameters={"rope_type": "yarn", "factor": 2.0}))


# Published configs (as on the hub, v4 spelling) and their published parameter counts: the
# mapping gets real shapes right without allocating anything (jax.eval_shape).
REAL_CONFIGS = {
    "Llama-3.2-1B": (1_235_814_400, dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        tie_word_embeddings=True, hidden_act="silu")),
    "Qwen2.5-0.5B": (494_032_768, dict(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        sliding_window=32768, use_sliding_window=False, max_window_layers=24,
        tie_word_embeddings=True, hidden_act="silu")),
    "gemma-2-2b": (2_614_341_888, dict(
        model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh")),
    "gpt2": (124_439_808, dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12,
                               n_head=12, n_positions=1024)),
}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_config_shapes(name):
  import jax  # pylint: disable=g-import-not-at-top
  count, d = REAL_CONFIGS[name]
  cfg = hf.config_from_hf(d)
  abstract = jax.tree_util.tree_leaves(hf.abstract_params(cfg))
  assert sum(int(np.prod(x.shape)) for x in abstract) == count
