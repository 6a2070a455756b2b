"""MoE layer: routers, dispatch paths, aux losses vs transformers, bad input, expert parallelism."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ftjax.models import Decoder, ModelConfig
from ftjax.models import moe
from ftjax.objectives import ObjectiveContext, get as get_objective

from conftest import run_python


def _cfg(**kw):
  base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
              num_kv_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
  base.update(kw)
  return ModelConfig(**base)


def _block_init(cfg, b=2, t=16):
  x = jax.random.normal(jax.random.key(0), (b, t, cfg.hidden_size))
  seg = jnp.ones((b, t), jnp.int32)
  init = lambda: nn.unbox(moe.MoEBlock(cfg).init(jax.random.key(1), x, seg)["params"])
  params = {"params": jax.jit(init)()}  # init also returns an 'aux' collection: drop it
  return params, x, seg


def _block_apply(cfg, params, x, seg):
  """One MoE block (no scan): (y [B, T, D], collect_aux dict)."""
  f = jax.jit(lambda p, x, s: moe.MoEBlock(cfg).apply(p, x, s, mutable=["aux"]))
  y, v = f(params, x, seg)
  aux = jax.tree_util.tree_map(lambda a: a[None], v["aux"])  # as if one scanned layer
  return y, moe.collect_aux(aux)


def _init(cfg, b=2, t=8, seed=0):
  tok = jax.random.randint(jax.random.key(seed), (b, t), 1, cfg.vocab_size)
  init = lambda: nn.unbox(Decoder(cfg).init(jax.random.key(seed + 1), tok)["params"])
  params = jax.jit(init)()
  return params, tok


def test_param_layout_and_shared_expert():
  cfg = _cfg(moe_shared_intermediate_size=24, moe_router="sigmoid_bias")
  tok = jnp.ones((2, 8), jnp.int32)
  shapes = jax.eval_shape(lambda: nn.unbox(Decoder(cfg).init(jax.random.key(0), tok)))
  mlp = jax.tree_util.tree_map(lambda x: x.shape, shapes["params"]["layers"]["mlp"])
  assert mlp["experts"]["gate_proj"]["kernel"] == (2, 4, 32, 16)
  assert mlp["experts"]["down_proj"]["kernel"] == (2, 4, 16, 32)
  assert mlp["gate"]["kernel"] == (2, 32, 4)
  assert mlp["e_score_correction_bias"] == (2, 4)
  assert mlp["shared_expert"]["gate_proj"]["kernel"] == (2, 32, 24)
  assert mlp["shared_expert_gate"]["kernel"] == (2, 32, 1)
  y = _block_apply(cfg, *_block_init(cfg))[0]
  assert y.shape == (2, 16, 32) and bool(jnp.isfinite(y).all())


def test_routers_match_reference():
  logits = jax.random.normal(jax.random.key(0), (16, 6)) * 2
  lg = np.asarray(logits, np.float64)
  sm = np.exp(lg - lg.max(-1, keepdims=True))
  sm /= sm.sum(-1, keepdims=True)
  top = np.argsort(-sm, -1)[:, :2]
  for norm in (True, False):
    w, idx, probs = moe.route(logits, _cfg(num_experts=6, moe_norm_topk_prob=norm))
    ref_w = np.take_along_axis(sm, top, -1)
    if norm:
      ref_w /= ref_w.sum(-1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(idx), top)
    np.testing.assert_allclose(np.asarray(w), ref_w, atol=1e-6)
    np.testing.assert_allclose(np.asarray(probs), sm, atol=1e-6)
  w, idx, _ = moe.route(logits, _cfg(num_experts=6, moe_router="topk_softmax"))
  vals = np.take_along_axis(lg, top, -1)
  ref = np.exp(vals) / np.exp(vals).sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(w), ref, atol=1e-6)
  # sigmoid + bias: the bias moves the selection but the weights stay the unbiased scores.
  bias = jnp.zeros((6,)).at[5].set(100.0)
  w, idx, _ = moe.route(logits, _cfg(num_experts=6, moe_router="sigmoid_bias",
                                     moe_norm_topk_prob=False), bias)
  assert bool((idx == 5).any(-1).all())
  sig = 1 / (1 + np.exp(-lg))
  np.testing.assert_allclose(np.asarray(w), np.take_along_axis(sig, np.asarray(idx), -1),
                             atol=1e-6)


def test_dropless_equals_capacity_when_nothing_dropped():
  cfg = _cfg(moe_shared_intermediate_size=16)
  params, x, seg = _block_init(cfg)
  seg = seg.at[1, 12:].set(0)  # padding must not take capacity slots
  outs = [_block_apply(cfg.replace(moe_dispatch=d, moe_capacity_factor=cf), params, x, seg)
          for d, cf in (("dropless", 1.0), ("capacity", 2.0), ("capacity", 0.25))]
  (a, aux_a), (b, aux_b), (c, aux_c) = outs
  valid = np.asarray(seg, bool)
  np.testing.assert_allclose(np.asarray(a)[valid], np.asarray(b)[valid], atol=1e-5)
  assert float(aux_a["dropped_frac"]) == 0.0 and float(aux_b["dropped_frac"]) == 0.0
  assert float(aux_c["dropped_frac"]) > 0.0  # cf=0.25 cannot hold every assignment
  assert not np.allclose(np.asarray(a)[valid], np.asarray(c)[valid], atol=1e-5)
  # statistics exclude the 4 padding tokens: 28 tokens x k=2 assignments
  np.testing.assert_allclose(np.asarray(aux_a["counts"].sum(-1)), [56.0])
  np.testing.assert_allclose(np.asarray(aux_a["load"].sum(-1)), [1.0], atol=1e-6)


def test_load_balancing_loss_matches_transformers():
  torch = pytest.importorskip("torch")
  from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
  num_layers, b, t, e, k = 3, 2, 8, 6, 2
  logits = jax.random.normal(jax.random.key(3), (num_layers, b * t, e)) * 1.5
  mask = np.ones((b, t), np.int64)
  mask[1, 5:] = 0
  valid = jnp.asarray(mask.reshape(-1))
  cfg = _cfg(num_experts=e, num_experts_per_tok=k)
  stats = [moe.router_stats(lg, moe.route(lg, cfg)[1], moe.route(lg, cfg)[2], valid, e)
           for lg in logits]
  counts = jnp.stack([s["router_counts"] for s in stats])
  prob_sum = jnp.stack([s["router_prob_sum"] for s in stats])
  tokens = jnp.stack([s["router_tokens"] for s in stats])
  hf_layers = tuple(torch.tensor(np.asarray(lg)) for lg in logits)
  hf_pooled = load_balancing_loss_func(hf_layers, e, k, torch.tensor(mask)).item()
  ours = moe.load_balancing_loss(counts, prob_sum, tokens, e, pooled=True)
  np.testing.assert_allclose(float(ours), hf_pooled, rtol=1e-5)
  # Per-layer mean (our training default) == mean of HF's loss computed one layer at a time.
  hf_per_layer = np.mean([load_balancing_loss_func((x,), e, k, torch.tensor(mask)).item()
                          for x in hf_layers])
  np.testing.assert_allclose(float(moe.load_balancing_loss(counts, prob_sum, tokens, e)),
                             hf_per_layer, rtol=1e-5)


def test_sft_adds_router_losses_and_metrics():
  cfg = _cfg(num_layers=1)
  params, tok = _init(cfg, b=2, t=8)
  batch = dict(tokens=tok, targets=jnp.roll(tok, -1, 1), loss_mask=jnp.ones_like(tok),
               segment_ids=jnp.ones_like(tok))
  sft = get_objective("sft")
  oc = ml_collections.ConfigDict(dict(name="sft", moe_aux_coef=1.0, moe_z_coef=0.0))
  ctx = ObjectiveContext(model=Decoder(cfg), config=oc)

  def loss(p):
    (s, d), metrics = sft(p, batch, None, ctx)
    return s / d, metrics
  (total, metrics), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  lb = float(metrics["moe_lb_loss"][0])
  assert lb >= 1.9  # >= k at perfect balance (transformers' normalisation)
  nll = float(metrics["loss"][0] / metrics["loss"][1])
  np.testing.assert_allclose(float(total) - nll, lb, rtol=1e-4)
  assert "moe_load/layer0_expert3" in metrics and "moe_dropped_frac" in metrics
  assert float(jnp.abs(g["layers"]["mlp"]["gate"]["kernel"]).sum()) > 0


@pytest.mark.parametrize("kw,match", [
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(moe_capacity_factor=0.0, moe_dispatch="capacity"), "moe_capacity_factor"),
    (dict(moe_router="bogus"), "moe_router"),
    (dict(moe_dispatch="bogus"), "moe_dispatch"),
])
def test_bad_config(kw, match):
  with pytest.raises(ValueError, match=match):
    _block_init(_cfg(**kw))


def test_expert_axis_must_divide_experts():
  with nn.logical_axis_rules((("expert", "expert"),)):
    moe.check_expert_sharding(8, {"expert": 4, "data": 2})
    with pytest.raises(ValueError, match="num_experts=6 is not divisible"):
      moe.check_expert_sharding(6, {"expert": 4, "data": 2})


_EP_CODE = r"""
import json, jax, jax.numpy as jnp, numpy as np, flax.linen as nn
from ftjax import sharding as shd
from ftjax.models import ModelConfig
from ftjax.models.moe import MoEBlock
assert len(jax.devices()) == 8
out = {}
x = jax.random.normal(jax.random.key(0), (8, 8, 32))
seg = jnp.ones((8, 8), jnp.int32)
mesh = shd.make_mesh([("data", 2), ("expert", 4)])
rules = shd.DEFAULT_RULES
for dispatch in ("dropless", "capacity"):
  cfg = ModelConfig(hidden_size=32, num_experts=8, num_experts_per_tok=2,
                    moe_intermediate_size=16, moe_dispatch=dispatch, moe_capacity_factor=4.0)
  block = MoEBlock(cfg)
  init = lambda r: block.init(r, x, seg)["params"]
  fwd = lambda p, x: block.apply({"params": p}, x, seg)
  ref_params = jax.jit(lambda r: nn.unbox(init(r)))(jax.random.key(1))  # one device
  ref = jax.jit(fwd)(ref_params, x)
  shardings = shd.logical_shardings(jax.eval_shape(init, jax.random.key(1)), mesh, rules)
  with shd.mesh_rules(mesh, rules):
    params = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(jax.random.key(1))
    kernel = params["experts"]["gate_proj"]["kernel"]
    xs = jax.device_put(x, shd.data_sharding(mesh, rules).update(
        spec=jax.sharding.PartitionSpec(("data", "fsdp", "expert"))))
    y = jax.jit(fwd)(params, xs)
  out[dispatch] = dict(diff=float(np.abs(np.asarray(y) - np.asarray(ref)).max()),
                       spec=str(kernel.sharding.spec), devices=len(kernel.sharding.device_set))
try:  # 6 experts over an expert axis of 4: one clear error at trace time
  with shd.mesh_rules(mesh, rules):
    jax.eval_shape(lambda r: MoEBlock(cfg.replace(num_experts=6)).init(r, x, seg),
                   jax.random.key(0))
  out["bad"] = "no error"
except ValueError as e:
  out["bad"] = str(e)
print("RESULT" + json.dumps(out))
"""


def test_expert_parallel_8_devices_matches_1():
  r = run_python(_EP_CODE, devices=8, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  line = [l for l in r.stdout.splitlines() if l.startswith("RESULT")][-1]
  out = json.loads(line[len("RESULT"):])
  for dispatch in ("dropless", "capacity"):
    assert "expert" in out[dispatch]["spec"] and out[dispatch]["devices"] == 8, out
    assert out[dispatch]["diff"] < 1e-5, out
  assert "num_experts=6 is not divisible by the expert mesh axes" in out["bad"], out["bad"]
