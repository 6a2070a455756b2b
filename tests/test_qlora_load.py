"""QLoRA from an HF checkpoint quantises each leaf as it loads: same params, no fp32 kernels kept."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


def _qlora_cfg(cfg, **kw):
  from ftjax import peft  # pylint: disable=g-import-not-at-top
  pc = ml_collections.ConfigDict(dict(method="qlora", r=4, alpha=8.0, block_size=32,
                                      double_quant=True, **kw))
  return peft.apply_peft(cfg, pc)


def test_quantise_on_load_equals_quantise_after(tmp_path):
  from ftjax import peft  # pylint: disable=g-import-not-at-top
  from ftjax.models import Decoder, hf  # pylint: disable=g-import-not-at-top
  from ftjax.models import hf_testing as ht  # pylint: disable=g-import-not-at-top
  src = ht.save_tiny("llama", str(tmp_path / "src"))
  cfg, base = hf.load_hf(src)
  full = _qlora_cfg(cfg)
  tok = jnp.zeros((1, 4), jnp.int32)
  after = peft.init_adapters(base, Decoder(full), jax.random.key(0), tok)

  _, qbase = hf.load_hf(src, leaf_fn=peft.tree.nf4_leaf_fn(full))
  quantised = [p for p, d in peft.tree.linear_dicts(qbase) if "kernel_nf4" in d]
  assert quantised and all("kernel" not in d for _, d in peft.tree.linear_dicts(qbase))
  on_load = peft.init_adapters(qbase, Decoder(full), jax.random.key(0), tok, donate=True)

  la, lb = jax.tree_util.tree_leaves_with_path(after), jax.tree_util.tree_leaves_with_path(on_load)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (p, a), (_, b) in zip(la, lb):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), p


def test_runner_init_quantises_while_loading(tmp_path, monkeypatch):
  """state.init_params with hf_path + qlora hands load_hf the NF4 leaf_fn."""
  from ftjax import peft  # pylint: disable=g-import-not-at-top
  from ftjax import sharding as shd  # pylint: disable=g-import-not-at-top
  from ftjax.config import load_config  # pylint: disable=g-import-not-at-top
  from ftjax.models import hf  # pylint: disable=g-import-not-at-top
  from ftjax.models import hf_testing as ht  # pylint: disable=g-import-not-at-top
  from ftjax.train import state  # pylint: disable=g-import-not-at-top
  src = ht.save_tiny("llama", str(tmp_path / "src"))
  config = load_config(f"qlora_hf:path={src}")
  config.peft.block_size = 32
  seen = []
  real = hf.load_hf

  def spy(*a, leaf_fn=None, **kw):
    seen.append(leaf_fn)
    return real(*a, leaf_fn=leaf_fn, **kw)
  monkeypatch.setattr(hf, "load_hf", spy)
  model_cfg = state.model_config(config)
  mesh = shd.make_mesh(config.mesh)
  rules = shd.rules_from_config(config.sharding.rules)
  _, params = state.init_params(config, model_cfg, mesh, rules, jax.random.key(0))
  assert len(seen) == 1 and seen[0] is not None
  linears = list(peft.tree.linear_dicts(params))
  assert any("kernel_nf4" in d for _, d in linears)
  assert all("kernel" not in d for _, d in linears if "kernel_nf4" in d)
