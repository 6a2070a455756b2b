"""PEFT interoperability: ftjax adapters load in HF PEFT with the same logits, and back."""

import jax
import ml_collections
import numpy as np
import pytest

from ftjax import peft
from ftjax.models import Decoder, hf
from ftjax.models.hf_testing import (assert_close_on_real, ftjax_logits, hf_logits,
                                      padding_batch, save_tiny, torch_causal_lm)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  path = save_tiny("llama", tmp_path_factory.mktemp("llama"))
  cfg, params = hf.load_hf(path)
  return path, cfg, params


def _perturb(params):
  def f(p, x):
    if p[-1].key in ("lora_B", "lora_magnitude"):
      return x + 0.05 * jax.random.normal(jax.random.key(x.size + len(p)), x.shape)
    return x
  return jax.tree_util.tree_map_with_path(f, params)


@pytest.mark.parametrize("kw", [
    dict(use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 4}),
    dict(method="dora", target_modules=["q_proj", "v_proj", "up_proj"]),
    dict(target_modules=["q_proj"], modules_to_save=["lm_head", "k_proj"]),  # trained in full
])
def test_export_loads_in_peft_with_same_logits(llama, tmp_path, kw):
  path, cfg, base = llama
  pc = ml_collections.ConfigDict(dict(dict(method="lora", r=4, alpha=8), **kw))
  pcfg = peft.apply_peft(cfg, pc)
  params = _perturb(peft.init_adapters(base, Decoder(pcfg), jax.random.key(0),
                                       np.zeros((1, 4), np.int32)))
  saved = kw.get("modules_to_save", ())
  params = jax.tree_util.tree_map_with_path(  # the modules_to_save weights move too
      lambda p, x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape)
      if p[-1].key == "kernel" and p[-2].key in saved else x, params)
  out = peft.export_adapter(params, pcfg, tmp_path / "adapter", base_model_name_or_path=path)
  model = hf_peft.PeftModel.from_pretrained(torch_causal_lm(path), str(out))
  tokens, mask = padding_batch(cfg.vocab_size)
  ours = ftjax_logits(pcfg, params, tokens, mask)
  theirs = hf_logits(path, tokens, mask, model=model)
  assert_close_on_real(ours, theirs)
  assert np.abs(ours - ftjax_logits(cfg, base, tokens, mask)).max() > 1e-3  # adapters matter
  # Round trip through our own importer.
  params2, cfg2 = peft.load_adapter(out, base, cfg)
  assert_close_on_real(ftjax_logits(cfg2, params2, tokens, mask), ours, atol=1e-6)


def test_import_peft_adapter_and_bad_shapes(llama, tmp_path):
  path, cfg, base = llama
  torch.manual_seed(0)
  lcfg = hf_peft.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", use_dora=True,
                            init_lora_weights=False)
  model = hf_peft.get_peft_model(torch_causal_lm(path), lcfg)
  model.save_pretrained(str(tmp_path / "theirs"))
  model.eval()
  tokens, mask = padding_batch(cfg.vocab_size)
  theirs = hf_logits(path, tokens, mask, model=model)
  params, pcfg = peft.load_adapter(tmp_path / "theirs", base, cfg)
  assert_close_on_real(ftjax_logits(pcfg, params, tokens, mask), theirs)
  merged, mcfg = peft.merge(params, pcfg)
  assert_close_on_real(ftjax_logits(mcfg, merged, tokens, mask), theirs)
  # The same adapter on a base with another MLP size: a clear error naming the tensor.
  small = save_tiny("llama", tmp_path / "small", intermediate_size=64)
  scfg, sparams = hf.load_hf(small)
  with pytest.raises(ValueError, match=r"adapter_model.safetensors: .*has shape"):
    peft.load_adapter(tmp_path / "theirs", sparams, scfg)
