"""PEFT without Hugging Face: NF4 numerics, LoRA/DoRA/QLoRA init and merge, masks, HFT, errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ftjax import peft
from ftjax.models import Decoder, ModelConfig
from ftjax.peft import nf4

CFG = ModelConfig(vocab_size=32, hidden_size=64, intermediate_size=64, num_layers=2)
TOK = jax.random.randint(jax.random.key(1), (2, 8), 0, 32)


@pytest.fixture(scope="module")
def base():
  return nn.unbox(Decoder(CFG).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])


def _peft(method="lora", **kw):
  return ml_collections.ConfigDict(dict(dict(method=method, r=4, alpha=8), **kw))


def _adapted(base, pc, seed=2):
  cfg = peft.apply_peft(CFG, pc)
  params = peft.init_adapters(base, Decoder(cfg), jax.random.key(seed), jnp.zeros((1, 4),
                                                                                  jnp.int32))
  return cfg, params


def _perturb(params, scale=0.1):
  def f(path, x):
    if path[-1].key in ("lora_B", "lora_magnitude"):
      return x + scale * jax.random.normal(jax.random.key(len(path) + x.size), x.shape)
    return x
  return jax.tree_util.tree_map_with_path(f, params)


@functools.lru_cache(maxsize=None)
def _apply(cfg, disabled=False):
  def f(params):
    if disabled:
      with peft.adapters_disabled():  # read at trace time: a separate jit per mode
        return Decoder(cfg).apply({"params": params}, TOK)
    return Decoder(cfg).apply({"params": params}, TOK)
  return jax.jit(f)


def _logits(cfg, params, disabled=False):
  return np.asarray(_apply(cfg, disabled)(params))


def test_nf4_roundtrip_error_bound():
  w = jax.random.normal(jax.random.key(0), (3, 128, 40)) * 0.05
  for dq in (False, True):
    q = nf4.quantize(w, 64, dq)
    assert q["kernel_nf4"].dtype == jnp.uint8 and q["kernel_nf4"].shape == (3, 64, 40)
    back = nf4.dequantize(q, 64)
    absmax = jnp.repeat(jnp.max(jnp.abs(w.reshape(3, 2, 64, 40)), axis=2), 64, axis=1)
    err = jnp.abs(back - w)
    slack = 0.02 * absmax if dq else 1e-7  # int8 absmax adds a small relative error
    assert bool(jnp.all(err <= nf4.MAX_HALF_GAP * absmax + slack))
    # The block maximum itself is exact (code +-1) without double quantisation.
    if not dq:
      assert float(jnp.max(jnp.abs(back).max(axis=1) - jnp.abs(w).max(axis=1))) < 1e-7
  # Memory: 4 bits + one fp32 absmax per 64 -> 14.1% of fp32; 12.9% with double quant.
  assert nf4.nbytes(nf4.quantize(w, 64)) / (w.size * 4) <= 0.1407
  assert nf4.nbytes(nf4.quantize(w, 64, True)) / (w.size * 4) < 0.135


@pytest.mark.parametrize("method,kw", [("lora", {"use_rslora": True}), ("dora", {}),
                                       ("qlora", {"use_dora": True, "double_quant": True})])
def test_init_merge_disable(base, method, kw):
  cfg, params = _adapted(base, _peft(method, **kw))
  ref = _logits(CFG, base)
  out0 = _logits(cfg, params)
  if method == "qlora":  # NF4 base: close to the fp32 base, and equal to its own dequantised base
    assert np.abs(out0 - ref).max() < 0.2 * np.abs(ref).max()
  else:
    np.testing.assert_allclose(out0, ref, atol=1e-5)
  params = _perturb(params)
  out = _logits(cfg, params)
  assert np.abs(out - out0).max() > 1e-3
  off = _logits(cfg, params, disabled=True)
  np.testing.assert_allclose(off, out0, atol=1e-5)  # base logits from the same params
  merged, mcfg = peft.merge(params, cfg)
  assert mcfg.peft is None and "lora_A" not in merged["layers"]["mlp"]["up_proj"]
  np.testing.assert_allclose(_logits(mcfg, merged), out, atol=1e-5)


def test_lora_init_matches_peft_distribution(base):
  _, params = _adapted(base, _peft(r=8))
  a = params["layers"]["self_attn"]["q_proj"]["lora_A"]
  assert a.shape == (2, 64, 8)
  assert float(jnp.abs(a).max()) <= 1 / np.sqrt(64) and float(a.std()) > 0.05
  assert not np.any(np.asarray(params["layers"]["self_attn"]["q_proj"]["lora_B"]))


def test_mask_split_merge_and_targets(base):
  pc = _peft(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
  cfg, params = _adapted(base, pc)
  attn = params["layers"]["self_attn"]
  assert attn["v_proj"]["lora_A"].shape == (2, 64, 2) and "lora_A" not in attn["k_proj"]
  assert "lora_A" not in params["layers"]["mlp"]["up_proj"]
  train, frozen = peft.split_trainable(params, peft.trainable_mask(params, pc))
  assert set(train["layers"]["self_attn"]) == {"q_proj", "v_proj"}
  assert all(set(v) <= {"lora_A", "lora_B"} for v in train["layers"]["self_attn"].values())
  back = peft.merge_trainable(train, frozen)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
  full = peft.trainable_mask(base, ml_collections.ConfigDict(dict(method="none")))
  assert all(jax.tree_util.tree_leaves(full))
  regex_cfg, _ = _adapted(base, _peft(target_modules=r".*mlp\.(up|down)_proj"))
  shapes = jax.eval_shape(lambda: nn.unbox(Decoder(regex_cfg).init(
      jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]))
  assert "lora_A" in shapes["layers"]["mlp"]["down_proj"]
  assert "lora_A" not in shapes["layers"]["mlp"]["gate_proj"]


def _cli_config(*overrides):
  """configs/lora_tiny.py through the command-line override path (`ftjax train` parses the same)."""
  from absl import flags
  from ml_collections import config_flags
  from conftest import REPO
  fv = flags.FlagValues()
  argv = ["x", f"--config={REPO}/configs/lora_tiny.py", *overrides]
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def _targeted(pc):
  cfg = peft.apply_peft(CFG, pc)
  shapes = jax.eval_shape(lambda: nn.unbox(Decoder(cfg).init(
      jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]))
  return sorted(p[-1] for p, d in peft.tree.module_dicts(shapes) if "lora_A" in d)


@pytest.mark.parametrize("flag, want", [
    ("""--config.peft.target_modules=("q_proj","v_proj")""", ["q_proj", "v_proj"]),
    ("--config.peft.target_modules=['o_proj']", ["o_proj"]),
    (r"--config.peft.target_modules=.*self_attn\.(q|k)_proj", ["k_proj", "q_proj"]),
    ("--config.peft.target_modules=all-linear",
     ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
])
def test_target_modules_from_the_command_line(flag, want):
  c = _cli_config(flag)
  assert _targeted(c.peft) == want
  # A string-typed field (a hand-written config) gets the same list from a tuple-looking string.
  assert _targeted(_peft(target_modules=flag.partition("=")[2])) == want


def test_modules_to_save_trains_in_full(base):
  c = _cli_config("--config.peft.target_modules=('q_proj',)",
                  "--config.peft.modules_to_save=lm_head")
  untied = CFG.replace(tie_embeddings=False)
  head = nn.unbox(Decoder(untied).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
  cfg = peft.apply_peft(untied, c.peft)
  assert cfg.peft.modules_to_save == ("lm_head",)
  params = peft.init_adapters(head, Decoder(cfg), jax.random.key(2), jnp.zeros((1, 4), jnp.int32))
  train, _ = peft.split_trainable(params, peft.trainable_mask(params, c.peft))
  assert set(train) == {"layers", "lm_head"} and set(train["lm_head"]) == {"kernel"}
  with pytest.raises(ValueError, match="match no module.*available"):
    peft.apply_peft(untied, _peft(modules_to_save=["nope"]))
  with pytest.raises(ValueError, match="also a LoRA target"):
    peft.apply_peft(untied, _peft(modules_to_save=["q_proj"]))
  with pytest.raises(ValueError, match="tied"):
    peft.apply_peft(CFG.replace(tie_embeddings=True), _peft(modules_to_save=["embed_tokens"]))
  with pytest.raises(ValueError, match="NF4"):
    peft.apply_peft(untied, _peft("qlora", target_modules=["q_proj"], modules_to_save=["k_proj"]))


def test_dropout_uses_dropout_rng(base):
  cfg, params = _adapted(base, _peft(dropout=0.5))
  params = _perturb(params, 1.0)
  apply = jax.jit(lambda p, r: Decoder(cfg).apply({"params": p}, TOK, rngs={"dropout": r}))
  det = _logits(cfg, params)
  r1, r2 = apply(params, jax.random.key(5)), apply(params, jax.random.key(5))
  np.testing.assert_array_equal(r1, r2)
  assert float(jnp.abs(r1 - det).max()) > 1e-4


def test_bad_input(base):
  with pytest.raises(ValueError, match="matches no module.*q_proj"):
    peft.apply_peft(CFG, _peft(target_modules=["nope_proj"]))
  with pytest.raises(ValueError, match="config.peft.r=0"):
    peft.apply_peft(CFG, _peft(r=0))
  with pytest.raises(ValueError, match="rank 65 > min"):
    peft.apply_peft(CFG, _peft(r=65))
  with pytest.raises(ValueError, match="different layers"):
    peft.apply_peft(CFG, _peft(target_modules=r"model\.layers\.0\.self_attn\.q_proj"))
  with pytest.raises(ValueError, match="multiple of config.peft.block_size=48"):
    peft.apply_peft(CFG, _peft("qlora", block_size=48))
  other = nn.unbox(Decoder(CFG.replace(intermediate_size=96)).init(
      jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
  cfg = peft.apply_peft(CFG, _peft())
  with pytest.raises(ValueError, match="has shape"):
    peft.init_adapters(other, Decoder(cfg), jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def test_hft_mask_half_per_layer_and_resumable(base):
  m0 = peft.hft_mask(base, 0, round_len=10, seed=3)
  m9 = peft.hft_mask(base, 9, round_len=10, seed=3)
  jax.tree_util.tree_map(np.testing.assert_array_equal, m0, m9)  # same round
  attn = np.stack([np.asarray(m0["layers"]["self_attn"][n]["kernel"]).reshape(-1)
                   for n in ("q_proj", "k_proj", "v_proj", "o_proj")])
  np.testing.assert_array_equal(attn.sum(0), [2, 2])  # 2 of 4 per layer
  mlp = np.stack([np.asarray(m0["layers"]["mlp"][n]["kernel"]).reshape(-1)
                  for n in ("gate_proj", "up_proj", "down_proj")])
  assert sorted(mlp.sum(0).tolist()) == [1, 2]  # alternating 2/1 of 3: half over a layer pair
  assert float(m0["embed_tokens"]["embedding"]) == 1.0
  rounds = [jax.jit(lambda s: peft.hft_mask(base, s, 10, 3))(jnp.int32(s)) for s in (0, 10, 20)]
  flat = [np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(r)]) for r in rounds]
  np.testing.assert_array_equal(flat[0], np.concatenate(
      [np.ravel(x) for x in jax.tree_util.tree_leaves(m0)]))  # traced step == python step
  assert not all(np.array_equal(flat[0], f) for f in flat[1:])  # rounds differ
  upd = jax.tree_util.tree_map(lambda x, s: jnp.ones_like(x) * s, base, m0)
  assert upd["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 64, 64)


def test_train_step_updates_only_adapters_and_hft_groups(base):
  """Through the train loop's step: frozen leaves have no optimizer state and never move; HFT's
  multipliers freeze the unselected groups of each layer."""
  from ftjax import objectives  # pylint: disable=g-import-not-at-top
  from ftjax.train.optim import make_optimizer  # pylint: disable=g-import-not-at-top
  from ftjax.train.step import make_train_step  # pylint: disable=g-import-not-at-top
  tx, sched = make_optimizer(ml_collections.ConfigDict(dict(lr=1e-2, schedule="constant")), 10)
  toks = TOK[None]
  batch = {"tokens": toks, "targets": jnp.roll(toks, -1, -1), "loss_mask": jnp.ones(toks.shape)}
  for pc in (_peft("lora"), ml_collections.ConfigDict(dict(method="hft", round_len=5, seed=1))):
    cfg = peft.apply_peft(CFG, pc)
    params = base if cfg is CFG else _adapted(base, pc)[1]
    train, frozen = peft.split_trainable(params, peft.trainable_mask(params, pc))
    scale_fn = peft.hft_update_scale_fn(train, pc) if pc.method == "hft" else None
    step = jax.jit(make_train_step(Decoder(cfg), objectives.get("sft"),
                                   ml_collections.ConfigDict(), tx, sched,
                                   update_scale_fn=scale_fn))
    state = {"params": train, "opt_state": tx.init(train), "step": jnp.int32(0),
             "rng": jax.random.key(0)}
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(state["opt_state"]))
    n_train = sum(x.size for x in jax.tree_util.tree_leaves(train))
    assert 0 <= n_state - 2 * n_train < 8  # Adam mu, nu (+ step counts): trainable leaves only
    new, _ = step(state, frozen, batch)
    moved = jax.tree_util.tree_map(lambda a, b: np.asarray(jnp.any(a != b, axis=tuple(
        range(1, a.ndim)) if a.ndim > 1 else None)), new["params"], train)
    if pc.method == "lora":
      assert set(frozen["layers"]["self_attn"]["q_proj"]) == {"kernel"}
      assert np.all(moved["layers"]["self_attn"]["q_proj"]["lora_B"])
    else:
      mask = peft.hft_mask(train, 0, 5, 1)
      for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        want = np.asarray(mask["layers"]["self_attn"][name]["kernel"]).reshape(-1) > 0
        np.testing.assert_array_equal(moved["layers"]["self_attn"][name]["kernel"], want)


@pytest.mark.parametrize("n_in,n_out", [(8, 6), (4, 8)])  # adapter stacked on output / input
def test_fused_lora_matmul_matches_plain_form(n_in, n_out):
  from ftjax.peft.lora import lora_matmul, stack_on_input  # pylint: disable=g-import-not-at-top
  assert stack_on_input(n_in, n_out) == (n_in < n_out)
  r = np.random.default_rng(0)
  x, w, a, bs, dy = (jnp.asarray(r.standard_normal(s), jnp.float32)
                     for s in ((2, 5, n_in), (n_in, n_out), (n_in, 3), (3, n_out), (2, 5, n_out)))
  plain = lambda x, w, a, bs: x @ w + (x @ a) @ bs
  y, vjp = jax.vjp(lora_matmul, x, w, a, bs)
  y_ref, vjp_ref = jax.vjp(plain, x, w, a, bs)
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  for g, g_ref in zip(vjp(dy), vjp_ref(dy)):
    np.testing.assert_allclose(g, g_ref, atol=1e-4)


def test_rank_down_and_skinny_weight_grad_match_autodiff():
  """The unfused paths' x @ A (dropout, QLoRA) takes A's gradient as (g^T x)^T on CPU."""
  from ftjax.models.layers import skinny_weight_grad  # pylint: disable=g-import-not-at-top
  from ftjax.peft.lora import rank_down  # pylint: disable=g-import-not-at-top
  r = np.random.default_rng(1)
  x, a, g = (jnp.asarray(r.standard_normal(s), jnp.float32)
             for s in ((2, 7, 12), (12, 4), (2, 7, 4)))
  np.testing.assert_allclose(jax.jit(skinny_weight_grad)(x.reshape(14, 12), g.reshape(14, 4)),
                             x.reshape(14, 12).T @ g.reshape(14, 4), atol=1e-5)
  y, vjp = jax.vjp(jax.jit(rank_down), x, a)
  y_ref, vjp_ref = jax.vjp(lambda x, a: x @ a, x, a)
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  for got, want in zip(vjp(g), vjp_ref(g)):
    np.testing.assert_allclose(got, want, atol=1e-5)
