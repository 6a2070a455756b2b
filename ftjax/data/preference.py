"""Preference data: paired (prompt, chosen, rejected) and unpaired KTO (prompt, completion, label).

Field names are TRL's. Values are plain strings, or conversational message lists rendered with the
tokenizer's chat template (TRL's "implicit prompt" form, where chosen/rejected are whole
conversations sharing a prefix, is split at the longest common prefix). Each side is encoded like
an SFT prompt/completion example (`ftjax.data.tokenize.encode_example`: bos + prompt | completion +
eos, loss on completion tokens only), one sequence per row, right-padded to seq_len.

Batches (dicts of numpy arrays; layout documented in ftjax/objectives/preference.py):
  paired: chosen_{tokens,targets,loss_mask,segment_ids,positions}, rejected_{...} [B, T],
          example_id [B] (-1 for padding rows), margin [B] when the data has a 'margin' field.
  kto:    {tokens,...} [B, T], label [B], kl_{tokens,...} [B, T], example_id [B]. The KL row of
          example j is prompt j + the completion of example j-1 of the same source file (a fixed
          pairing, as TRL's dataset-level cycling, so cached reference KL log-probs stay valid).

Config (config.data): kind 'preference' | 'kto', train / eval source lists as for SFT, truncation
('truncate' | 'drop' | 'error'), identical_pairs ('warn': keep and count | 'drop'), shuffle.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ftjax.data import io as dio
from ftjax.data import pipeline as pl
from ftjax.data import sources as dsrc
from ftjax.data import tokenize as tk

DataError = dio.DataError
ROW = ("tokens", "mask", "segment_ids", "positions")


# ----------------------------------------------------------------------------- encoding

def _empty(v) -> bool:
  return (isinstance(v, str) and not v.strip()) or (isinstance(v, (list, tuple)) and not v)


def _implicit_prompt(row, where):
  """TRL's implicit prompt: chosen/rejected are conversations sharing a message prefix."""
  c, r = row["chosen"], row["rejected"]
  if not (isinstance(c, list) and isinstance(r, list)):
    raise DataError(f"{where}: missing field 'prompt' (string chosen/rejected need a prompt)")
  n = 0
  while n < min(len(c), len(r)) - 1 and c[n] == r[n]:
    n += 1
  if n == 0:
    raise DataError(f"{where}: missing field 'prompt' and chosen/rejected share no prefix")
  return c[:n], c[n:], r[n:]


def pair_fields(row: Dict[str, Any], where: str):
  """(prompt, chosen, rejected) values of a paired row; DataError naming file:line and field."""
  for k in ("chosen", "rejected"):
    if k not in row:
      raise DataError(f"{where}: missing field {k!r} (row has {sorted(row)})")
  if "prompt" in row:
    p, c, r = row["prompt"], row["chosen"], row["rejected"]
  else:
    p, c, r = _implicit_prompt(row, where)
  for k, v in (("chosen", c), ("rejected", r)):
    if _empty(v):
      raise DataError(f"{where}: field {k!r} is an empty completion")
  return p, c, r


def _encode(tok, prompt, completion, where, policy, max_len, stats):
  enc = tk.encode_example(tok, {"prompt": prompt, "completion": completion}, where, "sft")
  enc, status = tk.apply_length_policy(enc, max_len, policy, where)
  if status != "ok":
    stats[status] = stats.get(status, 0) + 1
  return enc


def encode_pair(tok, row, where, *, max_len: int, policy: str, identical: str, stats):
  """Encoded example dict, or None when dropped (too long, or identical with 'drop')."""
  p, c, r = pair_fields(row, where)
  if c == r:
    stats["identical_pairs"] = stats.get("identical_pairs", 0) + 1
    if identical == "drop":
      stats["dropped"] = stats.get("dropped", 0) + 1
      return None
  ec = _encode(tok, p, c, where, policy, max_len, stats)
  er = _encode(tok, p, r, where, policy, max_len, stats)
  if ec is None or er is None:
    return None
  ex = {"chosen_tokens": ec[0], "chosen_mask": ec[1], "rejected_tokens": er[0],
        "rejected_mask": er[1]}
  if "margin" in row:
    ex["margin"] = np.float32(row["margin"])
  return ex


def encode_unpaired(tok, row, where, *, max_len: int, policy: str, stats):
  """KTO example: prompt ids, completion ids + mask, label; None when dropped."""
  for k in ("prompt", "completion", "label"):
    if k not in row:
      raise DataError(f"{where}: missing field {k!r} (row has {sorted(row)})")
  if _empty(row["completion"]):
    raise DataError(f"{where}: field 'completion' is an empty completion")
  label = row["label"]
  if not isinstance(label, (bool, np.bool_)) and label not in (0, 1):
    raise DataError(f"{where}: field 'label' must be a bool, got {label!r:.40}")
  enc = _encode(tok, row["prompt"], row["completion"], where, policy, max_len, stats)
  if enc is None:
    return None
  ids, mask = enc
  start = int(np.argmax(mask > 0)) if mask.any() else len(ids)
  return {"prompt": ids[:start], "completion": ids[start:], "completion_mask": mask[start:],
          "label": np.int32(bool(label))}


_CACHE: Dict[Tuple, Tuple[List[Dict[str, Any]], int, Dict[str, int]]] = {}


def encode_source(tok, path, split, kind, *, offset, max_len, policy, identical, stats):
  """(encoded examples, number of rows) of one source; memoised in-process, since eval
  rebuilds its iterator at every evaluation."""
  key = dsrc._cache_key(tok, {"path": path, "split": split, "format": kind}, max_len,  # pylint: disable=protected-access
                        (policy, identical, offset))
  if key not in _CACHE:
    local: Dict[str, int] = {}
    out, n = _encode_source(tok, path, split, kind, offset=offset, max_len=max_len,
                            policy=policy, identical=identical, stats=local)
    _CACHE[key] = (out, n, local)
  out, n, local = _CACHE[key]
  for k, v in local.items():
    stats[k] = stats.get(k, 0) + v
  return out, n


def _encode_source(tok, path, split, kind, *, offset, max_len, policy, identical, stats):
  rows = dio.read_rows(path, split)
  out = []
  for i, (row, where) in enumerate(rows):
    if kind == "kto":
      ex = encode_unpaired(tok, row, where, max_len=max_len, policy=policy, stats=stats)
    else:
      ex = encode_pair(tok, row, where, max_len=max_len, policy=policy, identical=identical,
                       stats=stats)
    if ex is not None:
      ex["example_id"] = np.int32(offset + i)
      out.append(ex)
  if not out:
    raise DataError(f"{path}: no usable preference examples ({len(rows)} rows, all dropped)")
  if kind == "kto":  # KL pair: this prompt with the previous example's completion (fixed, as TRL)
    for i, ex in enumerate(out):
      prev = out[i - 1]
      ex["kl_completion"], ex["kl_completion_mask"] = prev["completion"], prev["completion_mask"]
  return out, len(rows)


# ----------------------------------------------------------------------------- rows and batches

def _pad(ids, mask, seq_len: int, pad_id: int) -> Dict[str, np.ndarray]:
  n = min(len(ids), seq_len)
  t = np.arange(seq_len)
  tokens = np.full(seq_len, pad_id, np.int32)
  tokens[:n] = ids[:n]
  m = np.zeros(seq_len, np.int32)
  m[:n] = mask[:n]
  return {"tokens": tokens, "mask": m, "segment_ids": (t < n).astype(np.int32),
          "positions": np.where(t < n, t, 0).astype(np.int32)}


def _stack(rows: List[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _model_rows(rows, pad_id, prefix="") -> Dict[str, np.ndarray]:
  return {prefix + k: v for k, v in pl.shift_targets(_stack(rows), pad_id).items()}


def paired_batch(examples, seq_len: int, pad_id: int) -> Dict[str, np.ndarray]:
  out = {}
  for side in ("chosen_", "rejected_"):
    rows = [_pad(e[side + "tokens"], e[side + "mask"], seq_len, pad_id) for e in examples]
    out.update(_model_rows(rows, pad_id, side))
  out["example_id"] = np.asarray([e["example_id"] for e in examples], np.int32)
  if "margin" in examples[0]:
    out["margin"] = np.asarray([e["margin"] for e in examples], np.float32)
  return out


def kto_batch(examples, seq_len: int, pad_id: int) -> Dict[str, np.ndarray]:
  """Main rows and KL rows (prompt + the previous example's completion) for one global batch."""
  main, kl = [], []
  for e in examples:
    main.append(_pad(np.concatenate([e["prompt"], e["completion"]]),
                     np.concatenate([np.zeros_like(e["prompt"]), e["completion_mask"]]),
                     seq_len, pad_id))
    kl.append(_pad(np.concatenate([e["prompt"], e["kl_completion"]]),
                   np.concatenate([np.zeros_like(e["prompt"]), e["kl_completion_mask"]]),
                   seq_len, pad_id))
  out = _model_rows(main, pad_id)
  out.update(_model_rows(kl, pad_id, "kl_"))
  out["label"] = np.asarray([e["label"] for e in examples], np.int32)
  out["example_id"] = np.asarray([e["example_id"] for e in examples], np.int32)
  return out


def build_preference_iterator(data_cfg, tokenizer, *, split: str, global_batch_size: int,
                              seq_len: int, seed: int, process_index: int = 0,
                              process_count: int = 1, num_epochs: Optional[int] = None):
  """Iterator of this process's rows of each global batch (same contract as build_iterator)."""
  kind = data_cfg.get("kind", "preference")
  if kind not in ("preference", "kto"):
    raise ValueError(f"config.data.kind={kind!r}: preference iterator needs 'preference' or 'kto'")
  identical = data_cfg.get("identical_pairs", "warn")
  if identical not in ("warn", "drop"):
    raise ValueError(f"config.data.identical_pairs={identical!r}: expected 'warn' or 'drop'")
  policy = data_cfg.get("truncation", "truncate")
  max_len = int(data_cfg.get("max_length") or seq_len)
  if max_len > seq_len:
    raise ValueError(f"config.data.max_length={max_len} exceeds train.seq_len={seq_len}")
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  stats: Dict[str, int] = {"examples": 0, "truncated": 0, "dropped": 0, "identical_pairs": 0}
  per_source, weights, offset = [], [], 0
  for src in dsrc.sources(data_cfg, split):
    elems, n_rows = encode_source(tokenizer, src["path"], src["split"], kind, offset=offset,
                                  max_len=max_len, policy=policy, identical=identical,
                                  stats=stats)
    per_source.append(elems)
    weights.append(src["weight"])
    offset += n_rows
  stats["examples"] = sum(len(s) for s in per_source)
  if stats["identical_pairs"] and identical == "warn":
    logging.warning("%s: %d preference pairs have chosen == rejected (kept; set "
                    "config.data.identical_pairs='drop' to drop them)", split,
                    stats["identical_pairs"])
  train = split == "train"
  ds = pl.mixed_source(per_source, weights, seed=seed,
                       shuffle=bool(data_cfg.get("shuffle", True)) and train,
                       num_epochs=num_epochs, mix=train)
  make = kto_batch if kind == "kto" else paired_batch
  pad_values = {k: pad_id for k in ("tokens", "targets", "kl_tokens", "kl_targets",
                                    "chosen_tokens", "chosen_targets", "rejected_tokens",
                                    "rejected_targets")}
  pad_values["example_id"] = -1

  def batch_fn(examples):
    return pl.pad_batch(make(list(examples), seq_len, pad_id), global_batch_size, pad_values)

  ds = ds.batch(global_batch_size, batch_fn=batch_fn)
  return pl.SlicingIterator(ds.to_iter_dataset(pl._READ), process_index=process_index,  # pylint: disable=protected-access
                            process_count=process_count, global_batch_size=global_batch_size,
                            stats=stats)
