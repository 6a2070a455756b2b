"""LoRA / DoRA on the token embedding and the LM head (PEFT's lora.Embedding and lm_head), untied
and tied: parity with HF PEFT both ways, merge, targeting rules and the train step."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ftjax import peft
from ftjax.models import Decoder, ModelConfig, hf
from ftjax.models.hf_testing import (assert_close_on_real, ftjax_logits, hf_logits,
                                      padding_batch, save_tiny, torch_causal_lm)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_peft = pytest.importorskip("peft")

TARGETS = ["embed_tokens", "lm_head", "q_proj"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  out = {}
  for tied in (False, True):
    path = save_tiny("llama", tmp_path_factory.mktemp(f"llama_tied{int(tied)}"),
                     tie_word_embeddings=tied)
    out[tied] = (path,) + tuple(hf.load_hf(path))
  return out


def _perturb(params):
  """Every adapter leaf moved (the embedding's A starts at zero, the head's B too)."""
  def f(p, x):
    if p[-1].key in ("lora_A", "lora_B", "lora_magnitude"):
      return x + 0.1 * jax.random.normal(jax.random.key(x.size + len(p)), x.shape)
    return x
  return jax.tree_util.tree_map_with_path(f, params)


def _adapted(cfg, base, **kw):
  pc = ml_collections.ConfigDict(dict(dict(method="lora", r=4, alpha=8, target_modules=TARGETS),
                                      **kw))
  pcfg = peft.apply_peft(cfg, pc)
  params = peft.init_adapters(base, Decoder(pcfg), jax.random.key(0), np.zeros((1, 4), np.int32))
  return pcfg, params


@pytest.mark.parametrize("tied,kw", [(False, dict(use_rslora=True, rank_pattern={"lm_head": 2})),
                                     (True, dict(method="dora"))])
def test_export_loads_in_peft_merge_and_reimport(models, tmp_path, tied, kw):
  path, cfg, base = models[tied]
  assert cfg.tie_embeddings == tied
  pcfg, params = _adapted(cfg, base, **kw)
  tokens, mask = padding_batch(cfg.vocab_size)
  base_logits = ftjax_logits(cfg, base, tokens, mask)
  assert_close_on_real(ftjax_logits(pcfg, params, tokens, mask), base_logits, atol=1e-5)  # step 0 == base
  emb = params["embed_tokens"]
  assert emb["lora_A"].shape == (cfg.vocab_size, 4) and not np.any(np.asarray(emb["lora_A"]))
  assert abs(float(np.std(emb["lora_B"])) - 1.0) < 0.25  # PEFT: A = 0, B ~ N(0, 1)
  assert params["lm_head"]["lora_A"].shape == (cfg.hidden_size, 4 if tied else 2)
  assert ("kernel" in params["lm_head"]) != tied  # a tied head owns no kernel
  params = _perturb(params)
  out = peft.export_adapter(params, pcfg, tmp_path / "adapter", base_model_name_or_path=path)
  model = hf_peft.PeftModel.from_pretrained(torch_causal_lm(path), str(out))
  names = dict(model.named_modules())
  assert isinstance(names["base_model.model.model.embed_tokens"], hf_peft.tuners.lora.Embedding)
  assert isinstance(names["base_model.model.lm_head"], hf_peft.tuners.lora.Linear)
  ours = ftjax_logits(pcfg, params, tokens, mask)
  assert_close_on_real(ours, hf_logits(path, tokens, mask, model=model))
  assert np.abs(ours - base_logits).max() > 1e-2
  # Each of the two adapters matters on its own (so neither side can silently drop one).
  for name in ("embed_tokens", "lm_head"):
    part = dict(params, **{name: {k: v for k, v in params[name].items()
                                  if k in ("embedding", "kernel")}})
    if not part[name]:
      part.pop(name)
    sub = pcfg.replace(peft=dataclasses.replace(
        pcfg.peft, target_modules=tuple(t for t in TARGETS if t != name)))
    assert np.abs(ftjax_logits(sub, part, tokens, mask) - ours).max() > 1e-3
  merged, mcfg = peft.merge(params, pcfg)
  assert mcfg.peft is None and not mcfg.tie_embeddings  # tied + adapted -> untied on merge
  assert set(merged["embed_tokens"]) == {"embedding"} and set(merged["lm_head"]) == {"kernel"}
  np.testing.assert_allclose(ftjax_logits(mcfg, merged, tokens, mask), ours, atol=1e-5)
  params2, cfg2 = peft.load_adapter(out, base, cfg)
  assert_close_on_real(ftjax_logits(cfg2, params2, tokens, mask), ours, atol=1e-6)


def test_import_peft_adapter_with_saved_embedding_layers(models, tmp_path):
  """A PEFT-made adapter (random A and B) whose save also holds the base embedding / head (PEFT's
  save_embedding_layers): they replace the base model's, as PeftModel.from_pretrained does."""
  path, cfg, base = models[False]
  torch.manual_seed(0)
  lcfg = hf_peft.LoraConfig(r=4, lora_alpha=16, target_modules=["embed_tokens", "lm_head",
                                                                "v_proj"],
                            init_lora_weights=False)
  model = hf_peft.get_peft_model(torch_causal_lm(path), lcfg)
  with torch.no_grad():
    model.base_model.model.model.embed_tokens.base_layer.weight.add_(0.05)
  model.save_pretrained(str(tmp_path / "theirs"))
  model.eval()
  tokens, mask = padding_batch(cfg.vocab_size)
  theirs = hf_logits(path, tokens, mask, model=model)
  params, pcfg = peft.load_adapter(tmp_path / "theirs", base, cfg)
  ours = ftjax_logits(pcfg, params, tokens, mask)
  assert_close_on_real(ours, theirs)
  merged, mcfg = peft.merge(params, pcfg)
  np.testing.assert_allclose(ftjax_logits(mcfg, merged, tokens, mask), ours, atol=1e-5)


CFG = ModelConfig(vocab_size=32, hidden_size=64, intermediate_size=64, num_layers=2)


@pytest.fixture(scope="module")
def tiny():
  return nn.unbox(Decoder(CFG).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])


def _pc(**kw):
  return ml_collections.ConfigDict(dict(dict(method="lora", r=4, alpha=8), **kw))


def test_targeting_rules_and_errors(tiny):
  shapes = lambda c: jax.eval_shape(lambda: nn.unbox(Decoder(c).init(
      jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]))
  s = shapes(peft.apply_peft(CFG, _pc(target_modules="all-linear")))  # as PEFT: no head/embed
  assert "lora_A" not in s["lm_head"] and "lora_A" not in s["embed_tokens"]
  assert "lora_A" in s["layers"]["self_attn"]["q_proj"]
  s = shapes(peft.apply_peft(CFG, _pc(target_modules=r"lm_head|model\.embed_tokens")))
  assert "lora_A" in s["lm_head"] and "lora_A" in s["embed_tokens"]
  assert "lora_A" not in s["layers"]["mlp"]["up_proj"]
  q = shapes(peft.apply_peft(CFG, _pc(method="qlora", target_modules=["lm_head"])))
  assert set(q["lm_head"]) == {"kernel", "lora_A", "lora_B"}  # the head is never NF4
  assert "lm_head" in peft.available_modules(CFG)
  assert "model.embed_tokens" in peft.available_modules(CFG)
  with pytest.raises(ValueError, match=r"rank 33 > min\(in, out\) = 32 for model.embed_tokens"):
    peft.apply_peft(CFG, _pc(target_modules=["embed_tokens"], r=33))
  with pytest.raises(ValueError, match="matches no module.*lm_head"):
    peft.apply_peft(CFG, _pc(target_modules=["embed"]))


def test_tied_step0_and_disabled(tiny):
  cfg = CFG.replace(tie_embeddings=True)
  base = {k: v for k, v in tiny.items() if k != "lm_head"}
  pcfg = peft.apply_peft(cfg, _pc(target_modules=["embed_tokens", "lm_head"]))
  params = peft.init_adapters(base, Decoder(pcfg), jax.random.key(0), jnp.zeros((1, 4),
                                                                                  jnp.int32))
  tok = jax.random.randint(jax.random.key(1), (2, 8), 0, 32)
  ref = Decoder(cfg).apply({"params": base}, tok)
  np.testing.assert_allclose(Decoder(pcfg).apply({"params": params}, tok), ref, atol=1e-5)
  params = _perturb(params)
  assert float(jnp.abs(Decoder(pcfg).apply({"params": params}, tok) - ref).max()) > 1e-3
  with peft.adapters_disabled():
    off = Decoder(pcfg).apply({"params": params}, tok)
  np.testing.assert_allclose(off, ref, atol=1e-5)


def test_train_step_moves_only_embed_and_head_adapters(tiny):
  from ftjax import objectives  # pylint: disable=g-import-not-at-top
  from ftjax.train.optim import make_optimizer  # pylint: disable=g-import-not-at-top
  from ftjax.train.step import make_train_step  # pylint: disable=g-import-not-at-top
  tx, sched = make_optimizer(ml_collections.ConfigDict(dict(lr=1e-2, schedule="constant")), 10)
  pc = _pc(target_modules=["embed_tokens", "lm_head"])
  cfg = peft.apply_peft(CFG, pc)
  params = peft.init_adapters(tiny, Decoder(cfg), jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  train, frozen = peft.split_trainable(params, peft.trainable_mask(params, pc))
  assert {k: set(v) for k, v in train.items()} == {"embed_tokens": {"lora_A", "lora_B"},
                                                   "lm_head": {"lora_A", "lora_B"}}
  assert set(frozen["embed_tokens"]) == {"embedding"} and set(frozen["lm_head"]) == {"kernel"}
  toks = jax.random.randint(jax.random.key(1), (1, 2, 8), 0, 32)
  batch = {"tokens": toks, "targets": jnp.roll(toks, -1, -1), "loss_mask": jnp.ones(toks.shape)}
  step = jax.jit(make_train_step(Decoder(cfg), objectives.get("sft"), ml_collections.ConfigDict(),
                                 tx, sched))
  state = {"params": train, "opt_state": tx.init(train), "step": jnp.int32(0),
           "rng": jax.random.key(0)}
  new, _ = step(state, frozen, batch)
  moved = lambda a, b: bool(jnp.any(a != b))
  # A = 0 at init: only the embedding's A gets a gradient (rows of the tokens seen); the head's B
  # (zero) gets one too.
  assert moved(new["params"]["embed_tokens"]["lora_A"], train["embed_tokens"]["lora_A"])
  assert moved(new["params"]["lm_head"]["lora_B"], train["lm_head"]["lora_B"])
  unseen = np.setdiff1d(np.arange(32), np.asarray(toks))
  np.testing.assert_array_equal(new["params"]["embed_tokens"]["lora_A"][unseen], 0.0)
