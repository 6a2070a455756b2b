"""HF -> ftjax -> HF round trip (bit-identical tensors), sharded files, and clear load errors."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ftjax.models import hf
from ftjax.models import hf_testing as ht
from ftjax.models.hf_io import checkpoint_index, Reader


def _tensors(path):
  with Reader(checkpoint_index(path)) as r:
    return {name: r.read(name) for name in r.tensors}


@pytest.mark.parametrize("family,dtype", [("llama", None), ("gpt2", None),
                                          ("qwen2", "bfloat16")])
def test_round_trip_bit_identical(family, dtype, tmp_path):
  src = ht.save_tiny(family, tmp_path / "src", dtype=dtype)
  cfg, params = hf.load_hf(src, param_dtype=dtype)
  out = hf.export_hf(params, cfg, str(tmp_path / "out"), shard_size_bytes=40_000,
                     base_config=src)
  a, b = _tensors(src), _tensors(out)
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
    assert a[name].tobytes() == b[name].tobytes(), name
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))  # really sharded
  # transformers loads the export as the same model (ftjax == source is test_hf_parity's job;
  # test_hf_train compares an export with ftjax directly).
  tokens, mask = ht.padding_batch(cfg.vocab_size)
  want = ht.hf_logits(src, tokens, mask, dtype=dtype or "float32")
  got = ht.hf_logits(out, tokens, mask, dtype=dtype or "float32")
  np.testing.assert_array_equal(got, want)
  # ... and ftjax reads its own export to the same config.
  cfg2, _ = hf.load_hf(out, param_dtype=dtype)
  assert cfg2 == cfg


def test_sharded_hf_checkpoint_and_mesh(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from ftjax import sharding as shd  # pylint: disable=g-import-not-at-top
  src = ht.save_tiny("llama", tmp_path / "src", max_shard_size="50KB")
  assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
  mesh = shd.make_mesh([("fsdp", -1)])
  cfg, params = hf.load_hf(src, mesh=mesh)
  q = params["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.shape == (cfg.num_layers, cfg.hidden_size, cfg.num_heads * cfg.dim_per_head)
  assert isinstance(q.sharding, jax.sharding.NamedSharding)
  _, plain = hf.load_hf(src)  # no mesh: default device
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(plain)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _edit(path, fn):
  f = os.path.join(path, "model.safetensors")
  t = load_file(f)
  fn(t)
  save_file(t, f, metadata={"format": "pt"})


def test_clear_errors(tmp_path):
  src = ht.save_tiny("llama", tmp_path / "a")
  with open(os.path.join(src, "config.json")) as f:
    d = json.load(f)
  bad = str(tmp_path / "bad")
  os.makedirs(bad)
  with open(os.path.join(bad, "config.json"), "w") as f:
    json.dump(dict(d, model_type="t5"), f)
  with pytest.raises(ValueError, match="unsupported model_type 't5'"):
    hf.load_hf(bad)

  _edit(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
    hf.load_hf(src)

  src = ht.save_tiny("llama", tmp_path / "b")
  _edit(src, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(ValueError, match=r"unexpected tensor.*model\.layers\.0\.extra\.weight"):
    hf.load_hf(src)

  src = ht.save_tiny("llama", tmp_path / "c")
  _edit(src, lambda t: t.update({"model.norm.weight": np.zeros(7, np.float32)}))
  with pytest.raises(ValueError, match=r"model\.norm\.weight.*shape \(7,\), expected \(64,\)"):
    hf.load_hf(src)

  os.remove(os.path.join(src, "model.safetensors"))
  with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
    hf.load_hf(src)
