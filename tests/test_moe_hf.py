"""Mixtral / Qwen2-MoE / Qwen3-MoE: logits parity with transformers, v4 and v5 expert layouts,
export that transformers loads, and bad checkpoints."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ftjax.models import hf, hf_testing as ht  # noqa: E402

_MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    # shared expert + norm_topk_prob=False (the Qwen2-MoE default)
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True),
}
for _fam, _kw in _MOE.items():
  ht.TINY.setdefault(_fam, dict(ht._LLAMA_LIKE, **_kw))  # pylint: disable=protected-access


def _parity(path, model=None):
  tok, mask = ht.padding_batch(128)
  ref = ht.hf_logits(path, tok, mask, model=model)
  cfg, params = hf.load_hf(path)
  ours = ht.ftjax_logits(cfg, params, tok, mask)
  diff = np.abs((ref - ours) * mask[..., None]).max()
  assert diff <= 1e-4, diff
  return cfg, params


@pytest.mark.parametrize("family", sorted(_MOE))
def test_parity_and_v5_roundtrip(family, tmp_path):
  # save_pretrained (transformers 5.23) writes the v4 per-expert layout.
  src = ht.save_tiny(family, tmp_path / "src")
  names = json.dumps(list(_names(src)))
  assert "experts.0." in names
  cfg, params = _parity(src)
  assert cfg.num_experts == 4 and cfg.num_experts_per_tok == 2
  if family == "qwen2_moe":
    assert cfg.moe_shared_intermediate_size == 48 and not cfg.moe_norm_topk_prob
  # Export writes the v5 fused layout; transformers loads it and ftjax reads it back.
  out = hf.export_hf(params, cfg, str(tmp_path / "out"))
  assert "model.layers.0.mlp.experts.gate_up_proj" in _names(out)
  _parity(out)
  _, back = hf.load_hf(out)
  np.testing.assert_array_equal(np.asarray(back["layers"]["mlp"]["experts"]["up_proj"]["kernel"]),
                                np.asarray(params["layers"]["mlp"]["experts"]["up_proj"]["kernel"]))


def test_v5_fused_file_from_transformers_state_dict(tmp_path):
  """The in-memory v5 module names (fused experts) written straight to safetensors."""
  from safetensors.torch import save_file
  src = ht.save_tiny("mixtral", tmp_path / "src")
  model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
  sd = {k: v.contiguous() for k, v in model.state_dict().items()}
  assert "model.layers.0.mlp.experts.gate_up_proj" in sd
  v5 = tmp_path / "v5"
  os.makedirs(v5)
  save_file(sd, str(v5 / "model.safetensors"))
  with open(os.path.join(src, "config.json")) as f, open(v5 / "config.json", "w") as g:
    g.write(f.read())
  _parity(str(v5), model=model)


def _names(path):
  from ftjax.models import hf_io
  return set(hf_io.checkpoint_index(path))


def test_expert_count_disagreeing_with_config(tmp_path):
  src = ht.save_tiny("qwen3_moe", tmp_path / "src")
  with open(os.path.join(src, "config.json")) as f:
    d = json.load(f)
  d["num_experts"] = d["num_local_experts"] = 3
  with open(os.path.join(src, "config.json"), "w") as f:
    json.dump(d, f)
  with pytest.raises(ValueError, match="4 experts per layer but config.json says 3"):
    hf.load_hf(src)


def test_partially_dense_moe_config_refused():
  d = dict(ht.TINY["qwen2_moe"], model_type="qwen2_moe", decoder_sparse_step=2)
  with pytest.raises(ValueError, match="decoder_sparse_step"):
    hf.config_from_hf(d)
