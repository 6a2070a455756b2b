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


def test_gpt2_legacy_names(tmp_path):
  """Old GPT-2 files: no 'transformer.' prefix, causal-mask buffers stored as tensors."""
  import jax  # pylint: disable=g-import-not-at-top
  src = ht.save_tiny("gpt2", tmp_path / "g")
  _, want = hf.load_hf(src)

  def legacy(t):
    for k in list(t):
      t[k.replace("transformer.", "")] = t.pop(k)
    t["h.0.attn.bias"] = np.ones((1, 1, 64, 64), np.float32)
    t["h.0.attn.masked_bias"] = np.zeros((), np.float32)
  _edit(src, legacy)
  _, got = hf.load_hf(src)
  for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_load_straight_to_shardings_4_devices(tmp_path):
  """fsdp=2 x tensor=2 on 4 CPU devices: each device holds only its shard, values exact."""
  from conftest import run_python  # pylint: disable=g-import-not-at-top
  src = ht.save_tiny("llama", tmp_path / "l")
  r = run_python(f"""
import numpy as np, jax
from ftjax import sharding as shd
from ftjax.models import hf
mesh = shd.make_mesh([("fsdp", 2), ("tensor", 2)])
cfg, p = hf.load_hf({src!r}, mesh=mesh)
_, plain = hf.load_hf({src!r})
q = p["layers"]["self_attn"]["q_proj"]["kernel"]  # [L, embed->fsdp, heads->tensor]
assert q.sharding.spec[1:] == ("fsdp", "tensor"), q.sharding.spec
assert {{s.data.shape for s in q.addressable_shards}} == {{(2, 32, 32)}}
e = p["embed_tokens"]["embedding"]  # [vocab->tensor, embed->fsdp]
assert {{s.data.shape for s in e.addressable_shards}} == {{(64, 32)}}
for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(plain)):
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
print("OK")
""", devices=4)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_export_dtype_and_kept_config_fields(tmp_path):
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  src = ht.save_tiny("llama", tmp_path / "src", bos_token_id=5, eos_token_id=6)
  cfg, params = hf.load_hf(src)
  out = hf.export_hf(params, cfg, str(tmp_path / "out"), dtype="bfloat16", base_config=src)
  a, b = _tensors(src), _tensors(out)
  for name in a:
    np.testing.assert_array_equal(a[name].astype(ml_dtypes.bfloat16), b[name])
  with open(os.path.join(out, "config.json")) as f:
    d = json.load(f)
  assert (d["dtype"], d["bos_token_id"], d["eos_token_id"]) == ("bfloat16", 5, 6)
  tokens, mask = ht.padding_batch(cfg.vocab_size)
  ref = ht.hf_logits(src, tokens, mask)
  got = ht.hf_logits(out, tokens, mask)  # transformers loads it (upcast to float32)
  assert np.abs(got - ref)[mask.astype(bool)].max() < 0.1
