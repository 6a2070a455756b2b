"""Shared fixtures for the preference tests: random pairs in TRL's and ftjax's layouts.

The "model" is a fake whose logits are given: ftjax's `FakeModel.apply` returns
params['logits'], and `TorchFused` plays TRL's fused LM head (log_softmax of the same logits), so
a test compares every masking/shift/averaging step of the objectives without a real network.
"""

from __future__ import annotations

import collections
import types

import jax.numpy as jnp
import numpy as np
import torch


class FakeModel:
  """Linen-like: apply({'params': {'logits': [N, T, V]}}, tokens, ...) -> those logits."""

  def apply(self, variables, tokens, positions=None, segment_ids=None, **kw):
    del positions, segment_ids, kw
    logits = variables["params"]["logits"]
    assert logits.shape[:2] == tokens.shape
    return logits


def random_rows(rs, n, t, vocab, pad=0):
  """TRL layout: input_ids, attention_mask, completion_mask [n, t] (prompt then completion)."""
  ids = np.full((n, t), pad, np.int64)
  attn = np.zeros((n, t), np.int64)
  comp = np.zeros((n, t), np.int64)
  for i in range(n):
    p = rs.randint(1, 4)
    c = rs.randint(1, t - p + 1)
    ids[i, :p + c] = rs.randint(1, vocab, p + c)
    attn[i, :p + c] = 1
    comp[i, p:p + c] = 1
  return ids, attn, comp


def jax_rows(ids, attn, comp, prefix=""):
  """ftjax layout: tokens, targets (shifted left), loss_mask (on targets), segment_ids, positions."""
  n, t = ids.shape
  targets = np.concatenate([ids[:, 1:], np.zeros((n, 1), ids.dtype)], axis=1)
  loss_mask = np.concatenate([comp[:, 1:], np.zeros((n, 1), comp.dtype)], axis=1)
  pos = np.broadcast_to(np.arange(t), (n, t)) * attn
  return {prefix + "tokens": jnp.asarray(ids, jnp.int32),
          prefix + "targets": jnp.asarray(targets, jnp.int32),
          prefix + "loss_mask": jnp.asarray(loss_mask, jnp.float32),
          prefix + "segment_ids": jnp.asarray(attn, jnp.int32),
          prefix + "positions": jnp.asarray(pos, jnp.int32)}


def paired_batch(seed=0, b=4, t=9, vocab=11):
  """(ftjax batch, TRL tensors, logits [2B, T, V] float32) for B random pairs."""
  rs = np.random.RandomState(seed)
  ids, attn, comp = random_rows(rs, 2 * b, t, vocab)
  ids[b:, :3] = ids[:b, :3]  # share a prompt-like prefix (not required by the losses)
  batch = {}
  batch.update(jax_rows(ids[:b], attn[:b], comp[:b], "chosen_"))
  batch.update(jax_rows(ids[b:], attn[b:], comp[b:], "rejected_"))
  logits = rs.randn(2 * b, t, vocab).astype(np.float32) * 2
  return batch, (ids, attn, comp), logits


class TorchFused(torch.nn.Module):
  """TRL's fused LM head output (`FusedCausalLMOutput`) computed from given logits."""

  def __init__(self, table):
    super().__init__()
    self.table = table  # list of (input_ids tensor, logits tensor)

  def forward(self, input_ids, attention_mask=None, labels=None, fused_lm_head=True, **kw):
    del attention_mask, kw
    assert fused_lm_head
    logits = next(lg for ids, lg in self.table if torch.equal(ids, input_ids))
    lg = logits[:, :-1]
    lab = labels[:, 1:]
    mask = lab != -100
    lsm = torch.log_softmax(lg, -1)
    lp = lsm.gather(-1, lab.clamp(min=0)[..., None])[..., 0]
    return types.SimpleNamespace(
        log_probs=lp * mask, entropy=torch.zeros_like(lp),
        log_sum_sq_probs=torch.logsumexp(2 * lsm, -1) * mask,
        mean_logits=lg.mean(-1) * mask, is_top1=(lg.argmax(-1) == lab) & mask)


def fake_accelerator():
  ident = lambda x: x
  return types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=ident, gather=ident,
                               unwrap_model=ident)


def trainer_shell(cls, **attrs):
  """A TRL trainer object without __init__ (no model download, no accelerate state)."""
  t = object.__new__(cls)
  t.accelerator = fake_accelerator()
  t._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
  t._total_train_tokens = 0
  t._tp_size = 1
  t.aux_loss_enabled = False
  for k, v in attrs.items():
    setattr(t, k, v)
  return t


def ctx(model, **cfg):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from ftjax.objectives import ObjectiveContext  # pylint: disable=g-import-not-at-top
  return ObjectiveContext(model=model, config=ml_collections.ConfigDict(cfg))


def finalize(metrics):
  return {k: float(s) / max(float(c), 1e-9) for k, (s, c) in metrics.items()}
