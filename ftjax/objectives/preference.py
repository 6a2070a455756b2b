"""Preference objectives: shared per-sequence log-probs, reference modes, TRL-named metrics.

The losses live in small files that register themselves: `dpo.py` ('dpo', all TRL DPO loss types),
`simpo.py` ('simpo', 'cpo'), `orpo.py` ('orpo'), `kto.py` ('kto'), `reward.py` ('reward').

Batch layout (from `ftjax.data.preference`; one sequence per row, rows right-padded to T):
  paired data (DPO, SimPO, CPO, ORPO, reward):
    chosen_tokens                   [B, T] int32   prompt + completion ids, right-padded
    chosen_targets                  [B, T] int32   tokens shifted left (targets[t] = tokens[t+1])
    chosen_loss_mask                [B, T] float32 1 where targets[t] is a completion token
    chosen_segment_ids              [B, T] int32   1 on real tokens, 0 on padding
    chosen_positions                [B, T] int32
    rejected_* (same five keys)     [B, T]
    ref_chosen_logps, ref_rejected_logps [B] float32  only with objective.reference='precomputed'
    margin                          [B] float32    optional (reward model)
    example_id                      [B] int32      index of the pair in its split (-1 = padding row)
  unpaired data (KTO):
    tokens, targets, loss_mask, segment_ids, positions [B, T]; label [B] int32 (1 desirable)
    kl_tokens, kl_targets, kl_loss_mask, kl_segment_ids, kl_positions [B, T]: mismatched pairs,
      prompt j + completion of example j-1 in its file (TRL cycles completions the same way)
    ref_logps, ref_kl_logps [B] float32 only with objective.reference='precomputed'

Chosen and rejected rows go through the model in ONE forward pass ([2B, T] concatenated on the
batch axis), as TRL's concatenated forward does.

Reference log-probs (config.objective.reference):
  'copy'         a frozen copy of the initial params, passed by the loop as ctx.ref_params
  'adapters_off' the same params with LoRA/DoRA adapters disabled (`ftjax.peft.adapters_disabled`)
  'precomputed'  cached in the batch (see `precompute_reference`, `attach_reference`)
  'none'         reference-free (reference log-probs are 0)
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.objectives.common import forward, token_logps

ROW_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
REFERENCE_MODES = ("copy", "adapters_off", "precomputed", "none")


# ----------------------------------------------------------------------------- config checks

def get_beta(cfg, default: float = 0.1) -> float:
  beta = float(cfg.get("beta", default))
  if not beta > 0:
    raise ValueError(f"config.objective.beta={beta}: must be > 0")
  return beta


def reference_mode(cfg) -> str:
  mode = cfg.get("reference", "copy")
  if mode not in REFERENCE_MODES:
    raise ValueError(f"config.objective.reference={mode!r}: unknown (choose from {REFERENCE_MODES})")
  return mode


# ----------------------------------------------------------------------------- log-probs

def concat_rows(batch, prefixes: Sequence[str]) -> Dict[str, jax.Array]:
  """Row groups `prefix + key` stacked on the batch axis: [len(prefixes) * B, T] each."""
  out = {}
  for k in ROW_KEYS:
    parts = [batch[p + k] for p in prefixes if (p + k) in batch]
    if parts and len(parts) != len(prefixes):
      raise ValueError(f"preference batch: {k!r} present for some of {prefixes} only")
    if parts:
      out[k] = jnp.concatenate(parts, axis=0)
  for k in ("tokens", "targets", "loss_mask"):
    if k not in out:
      raise ValueError(f"preference batch: missing {[p + k for p in prefixes]} "
                       f"(have {sorted(batch)})")
  return out


def sequence_stats(model, params, rows, *, with_logits: bool = True, token_weights=None,
                   with_sum_sq: bool = False) -> Dict[str, jax.Array]:
  """One forward over rows [N, T] -> per-sequence stats (float32).

  Returns logps [N] (summed completion log-probs, each token times token_weights [N, T] if
  given), counts [N] (completion tokens), token_logps [N, T], mask [N, T] (completion targets),
  valid [N, T] (all real targets), and with_logits: logits_sum [N], the sum over completion tokens
  of the vocab-mean logit (TRL's `mean_logits`, no gradient), and correct [N, T] (argmax ==
  target); with_sum_sq: log_sum_sq [N, T] = log Σ_v p_v² (no gradient; WPO's weights).
  """
  from ftjax.objectives import moe_aux  # pylint: disable=g-import-not-at-top
  logits, aux = moe_aux.forward_model(model, params, rows)
  logp, correct = token_logps(logits, rows["targets"])
  mask = rows["loss_mask"].astype(jnp.float32)
  # Every real target (prompt + completion), for ORPO's full-sequence NLL: position t is a real
  # target when tokens t and t+1 are both real.
  seg = rows["segment_ids"] if "segment_ids" in rows else jnp.ones_like(rows["tokens"])
  nxt = jnp.pad(seg[:, 1:], ((0, 0), (0, 1)))
  valid = (seg > 0) & (nxt == seg)
  weighted = mask if token_weights is None else mask * token_weights
  out = {"logps": (logp * weighted).sum(-1), "counts": mask.sum(-1), "token_logps": logp,
         "mask": mask, "valid": valid.astype(jnp.float32)}
  if with_sum_sq:
    lsm = jax.nn.log_softmax(jax.lax.stop_gradient(logits).astype(jnp.float32), axis=-1)
    out["log_sum_sq"] = jax.nn.logsumexp(2.0 * lsm, axis=-1)
  if aux is not None:  # MoE router terms; objectives add them with moe_aux.add_terms
    out["moe_aux"] = aux
  if with_logits:
    mean_logits = jax.lax.stop_gradient(logits.mean(-1))
    out["logits_sum"] = (mean_logits * mask).sum(-1)
    out["correct"] = correct
  return out


def _adapters_disabled():
  from ftjax import peft  # pylint: disable=g-import-not-at-top
  if not hasattr(peft, "adapters_disabled"):
    raise ValueError("config.objective.reference='adapters_off' needs ftjax.peft.adapters_disabled")
  return peft.adapters_disabled()


def ld_token_weights(loss_mask: jax.Array, ld_alpha: float) -> jax.Array:
  """LD-DPO (arXiv 2409.06411) token weights [2B, T] for [chosen; rejected] completion masks:
  1 on each pair's first min(len_c, len_r) completion tokens, ld_alpha on the longer one's tail
  (TRL 1.16 `ld_alpha`)."""
  pos = jnp.cumsum(loss_mask, axis=-1)
  lens_c, lens_r = halves(loss_mask.sum(-1))
  shared = jnp.minimum(lens_c, lens_r)
  shared = jnp.concatenate([shared, shared])[:, None]
  return jnp.where(pos <= shared, 1.0, ld_alpha) * loss_mask


def reference_logps(params, rows, batch, ctx, cached_keys: Sequence[str],
                    token_weights=None) -> jax.Array:
  """Reference summed log-probs [N] for rows [N, T], per config.objective.reference (no grad).

  cached_keys: the batch keys holding precomputed values, concatenated in row order.
  token_weights [N, T]: per-token weights of the sum (LD-DPO); cached values must match them.
  """
  mode = reference_mode(ctx.config)
  n = rows["tokens"].shape[0]
  if mode == "none":
    return jnp.zeros((n,), jnp.float32)
  if mode == "precomputed":
    missing = [k for k in cached_keys if k not in batch]
    if missing:
      raise ValueError(f"config.objective.reference='precomputed' but the batch has no {missing} "
                       "(run ftjax.objectives.preference.precompute_reference first)")
    return jnp.concatenate([batch[k].astype(jnp.float32) for k in cached_keys])
  if mode == "copy":
    if ctx.ref_params is None:
      raise ValueError("config.objective.reference='copy' but no reference params were given")
    ref_params, cm = ctx.ref_params, contextlib.nullcontext()
  else:  # adapters_off: same weights, adapters bypassed; no second copy in memory
    spec = getattr(getattr(ctx.model, "cfg", None), "peft", None)
    if getattr(spec, "modules_to_save", ()):
      raise ValueError("config.objective.reference='adapters_off' with config.peft."
                       "modules_to_save: those modules train in full, so the adapters-off model "
                       "is not the base model; use reference='copy' or 'precomputed'")
    ref_params, cm = params, _adapters_disabled()
  with cm:
    stats = sequence_stats(ctx.model, jax.lax.stop_gradient(ref_params), rows, with_logits=False,
                           token_weights=token_weights)
  return jax.lax.stop_gradient(stats["logps"])


def paired_forward(params, batch, ctx, *, need_reference: bool = True, ld_alpha=None,
                   with_sum_sq: bool = False):
  """Policy stats for [chosen; rejected] in one pass, and reference logps [2B] (or None).

  ld_alpha: LD-DPO weighting of policy and reference logps (`ld_token_weights`); None = plain sums.
  """
  rows = concat_rows(batch, ("chosen_", "rejected_"))
  tw = None if ld_alpha is None else ld_token_weights(rows["loss_mask"].astype(jnp.float32),
                                                      ld_alpha)
  pol = sequence_stats(ctx.model, params, rows, token_weights=tw, with_sum_sq=with_sum_sq)
  ref = None
  if need_reference:
    ref = reference_logps(params, rows, batch, ctx, ("ref_chosen_logps", "ref_rejected_logps"),
                          token_weights=tw)
  return pol, ref


def row_weights(batch, n: int) -> jax.Array:
  """[n] float32: 1 for real rows, 0 for the padding rows of a final partial batch."""
  if "example_id" in batch:
    return (batch["example_id"] >= 0).astype(jnp.float32)
  return jnp.ones((n,), jnp.float32)


def safe_mean_logps(pol, w2) -> jax.Array:
  """[2B] completion log-probs averaged per token; padding rows (w2 = 0) get -1, not 0/0."""
  avg = pol["logps"] / jnp.maximum(pol["counts"], 1.0)
  return jnp.where(w2 > 0, avg, -1.0)


def halves(x: jax.Array):
  """[2B, ...] -> ([B, ...] chosen, [B, ...] rejected)."""
  b = x.shape[0] // 2
  return x[:b], x[b:]


# ----------------------------------------------------------------------------- metrics

def pair_metrics(pol, chosen_rewards, rejected_rewards, logps=None, w=None) -> Dict[str, tuple]:
  """TRL-named metrics as (sum, count) pairs; rewards [B] are detached here.

  logps [2B]: what `logps/*` report (default the summed log-probs; SimPO/ORPO pass averages).
  w [B]: row weights (0 for padding rows).
  """
  cr = jax.lax.stop_gradient(chosen_rewards)
  rr = jax.lax.stop_gradient(rejected_rewards)
  w = jnp.ones_like(cr) if w is None else w
  b = w.sum()
  lc, lr = halves(jax.lax.stop_gradient(pol["logps"] if logps is None else logps))
  sc, sr = halves(pol["logits_sum"])
  nc, nr = halves(pol["counts"])
  return {
      "rewards/chosen": ((w * cr).sum(), b),
      "rewards/rejected": ((w * rr).sum(), b),
      "rewards/accuracies": ((w * (cr > rr)).sum(), b),
      "rewards/margins": ((w * (cr - rr)).sum(), b),
      "logps/chosen": ((w * lc).sum(), b),
      "logps/rejected": ((w * lr).sum(), b),
      "logits/chosen": (sc.sum(), nc.sum()),
      "logits/rejected": (sr.sum(), nr.sum()),
  }


def chosen_nll(pol, mask=None):
  """(sum of -log p over chosen tokens, token count): TRL's token-mean NLL on the chosen half."""
  tok_c, _ = halves(pol["token_logps"])
  m_c, _ = halves(pol["mask"] if mask is None else mask)
  return -(tok_c * m_c).sum(), m_c.sum()


# ----------------------------------------------------------------------------- cached reference

_CACHE_KEYS = {"paired": ("chosen_", "rejected_"), "kto": ("", "kl_")}


def precompute_reference(model, ref_params, batches: Iterable[dict], *, kind: str = "paired",
                         ld_alpha=None):
  """One pass over `batches` (dicts of numpy arrays with `example_id`) -> cache table.

  Returns {"example_id": [N], "ref_chosen_logps": [N], "ref_rejected_logps": [N]} for paired data
  (for kind='kto': "ref_logps", "ref_kl_logps"), numpy float32, padding rows (id < 0) dropped.
  ld_alpha (paired only): LD-DPO-weighted sums, as the DPO objective computes them.
  """
  prefixes = _CACHE_KEYS[kind]
  names = (("ref_chosen_logps", "ref_rejected_logps") if kind == "paired"
           else ("ref_logps", "ref_kl_logps"))

  @jax.jit
  def ref_fn(params, rows):
    tw = None if ld_alpha is None else ld_token_weights(rows["loss_mask"].astype(jnp.float32),
                                                        ld_alpha)
    return sequence_stats(model, params, rows, with_logits=False, token_weights=tw)["logps"]

  ids, cols = [], ([], [])
  for batch in batches:
    if "example_id" not in batch:
      raise ValueError("precompute_reference: batches need 'example_id' (ftjax.data.preference)")
    rows = concat_rows({k: jnp.asarray(v) for k, v in batch.items()}, prefixes)
    logps = np.asarray(ref_fn(ref_params, rows))
    a, b = np.split(logps, 2)
    keep = np.asarray(batch["example_id"]) >= 0
    ids.append(np.asarray(batch["example_id"])[keep])
    cols[0].append(a[keep])
    cols[1].append(b[keep])
  table = {"example_id": np.concatenate(ids).astype(np.int64)}
  for name, col in zip(names, cols):
    table[name] = np.concatenate(col).astype(np.float32)
  return table


def save_reference(path: str, table: Dict[str, np.ndarray]):
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **table)
  os.replace(tmp, path)


def load_reference(path: str) -> Dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def attach_reference(batch: dict, table: Dict[str, np.ndarray]) -> dict:
  """Adds the cached reference columns to a host batch, looked up by `example_id`."""
  order = np.argsort(table["example_id"])
  sorted_ids = table["example_id"][order]
  ids = np.asarray(batch["example_id"])
  pos = np.clip(np.searchsorted(sorted_ids, ids), 0, len(sorted_ids) - 1)
  found = (sorted_ids[pos] == ids) | (ids < 0)
  if not found.all():
    raise ValueError(f"reference cache: no entry for example_id {ids[~found][:5].tolist()} "
                     "(stale cache? delete it to recompute)")
  out = dict(batch)
  for k, v in table.items():
    if k != "example_id":
      out[k] = np.where(ids >= 0, v[order][pos], 0.0).astype(np.float32)
  return out


class CachedReference:
  """A data iterator whose batches get the cached reference columns (by example_id)."""

  def __init__(self, it, table: Dict[str, np.ndarray]):
    self._it, self._table = it, table
    self.stats = getattr(it, "stats", {})

  def __iter__(self):
    return self

  def __next__(self):
    return attach_reference(next(self._it), self._table)

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)


def reference_cache_wrapper(config, workdir: str, model, ref_params, tokenizer, make_iter=None):
  """`wrap(it, split)` for the train loop: with config.objective.reference == 'precomputed',
  reference log-probs of every example of `split` are computed once with `ref_params` (one
  unshuffled epoch of full global batches; every process computes the whole table, so any row
  slice finds its entries), cached in `workdir/reference_logps_<split>.npz` (reused on resume)
  and attached to `it`'s batches by example_id. Otherwise `wrap` returns `it` unchanged.
  """
  if config.objective.get("reference") != "precomputed":
    return lambda it, split: it
  kind = "kto" if config.data.get("kind") == "kto" else "paired"
  ld_alpha = config.objective.get("ld_alpha", None) if kind == "paired" else None
  # LD-DPO sums differ from plain ones: their own cache file, never a stale plain one.
  suffix = "" if ld_alpha is None else f"_ld{float(ld_alpha):g}"
  tables: Dict[str, Dict[str, np.ndarray]] = {}
  if make_iter is None:
    def make_iter(split):
      from ftjax.data.preference import build_preference_iterator  # pylint: disable=g-import-not-at-top
      return build_preference_iterator(
          config.data, tokenizer, split=split, global_batch_size=int(config.train.batch_size),
          seq_len=int(config.train.seq_len), seed=0, num_epochs=1)

  def wrap(it, split):
    if split not in tables:
      path = os.path.join(workdir, f"reference_logps_{split}{suffix}.npz")
      if os.path.exists(path):
        tables[split] = load_reference(path)
      else:
        tables[split] = precompute_reference(model, ref_params, make_iter(split), kind=kind,
                                             ld_alpha=ld_alpha)
        if jax.process_index() == 0:
          save_reference(path, tables[split])
    return CachedReference(it, tables[split])
  return wrap


# Built-in preference losses register themselves on import.
from ftjax.objectives import dpo, kto, orpo, reward, simpo  # noqa: E402,F401  pylint: disable=g-import-not-at-top,wrong-import-position
