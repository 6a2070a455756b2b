"""config.data sources -> located rows -> encoded examples (with length policy and counts)."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

import numpy as np

from ftjax.data import io, tokenize

_HUB_SPLIT = {"train": "train", "eval": "test"}


def sources(data_cfg, split: str) -> List[Dict[str, Any]]:
  """config.data.<split> as a list of {path, weight, format, split} dicts.

  Entries may be plain path strings, dicts or ConfigDicts (ConfigDict turns lists into tuples).
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  raw = data_cfg.get(split) if hasattr(data_cfg, "get") else None
  key = f"config.data.{split}"
  if raw is None or isinstance(raw, (str, dict)) or hasattr(raw, "to_dict"):
    raw = [] if raw is None else [raw]
  out = []
  for i, s in enumerate(raw):
    if hasattr(s, "to_dict"):
      s = s.to_dict()
    if isinstance(s, str):
      s = {"path": s}
    if not isinstance(s, dict) or not s.get("path"):
      raise ValueError(f"{key}[{i}]: a source needs a 'path', got {s!r}")
    unknown = set(s) - {"path", "weight", "format", "split"}
    if unknown:
      raise ValueError(f"{key}[{i}]: unknown source keys {sorted(unknown)} "
                       "(known: path, weight, format, split)")
    w = float(s.get("weight", 1.0))
    if not w > 0:
      raise ValueError(f"{key}[{i}].weight must be > 0, got {w}")
    fmt = s.get("format") or data_cfg.get("format", "auto") or "auto"
    if fmt not in tokenize.FORMATS:
      raise ValueError(f"{key}[{i}].format: {fmt!r} unknown (expected one of "
                       f"{tokenize.FORMATS})")
    out.append({"path": str(s["path"]), "weight": w, "format": fmt,
                "split": s.get("split") or _HUB_SPLIT[split]})
  if not out:
    raise ValueError(f"{key}: no data sources configured")
  return out


def load_examples(data_cfg, split: str) -> List[Dict[str, Any]]:
  """Raw rows of every source of `split`, in file order (e.g. for eval generation).

  A "messages" row ending with an assistant turn also gets "completion" = that turn's content
  (what greedy decoding after encode_prompt should reproduce), unless it already has one.
  """
  out = []
  for s in sources(data_cfg, split):
    for row, _ in io.read_rows(s["path"], s["split"]):
      msgs = row.get("messages")
      if (isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict)
          and msgs[-1].get("role") == "assistant" and "completion" not in row):
        row = dict(row, completion=msgs[-1].get("content", ""))
      out.append(row)
  return out


_CACHE: Dict[Tuple, Tuple[List[Dict[str, np.ndarray]], Dict[str, int]]] = {}


def _cache_key(tok, src, max_length, policy):
  path = os.path.expanduser(src["path"])
  stamp = (os.path.getmtime(path), os.path.getsize(path)) if os.path.exists(path) else None
  return (id(tok), len(tok), getattr(tok, "name_or_path", ""), path, stamp, src["split"], src["format"], max_length, policy)


def encode_source(tok, src: Dict[str, Any], max_length: int, policy: str):
  """([{'tokens': int32[n], 'mask': int32[n]}], counts) for one source; memoised in-process
  (eval rebuilds its iterator every evaluation)."""
  key = _cache_key(tok, src, max_length, policy)
  if key in _CACHE:
    return _CACHE[key]
  rows = io.read_rows(src["path"], src["split"])
  counts = {"examples": 0, "truncated": 0, "dropped": 0}
  out = []
  for (_, where), enc in zip(rows, tokenize.encode_many(tok, rows, src["format"])):
    enc, status = tokenize.apply_length_policy(enc, max_length, policy, where)
    if status != "ok":
      counts[status] += 1
    if enc is None:
      continue
    if not tokenize.has_loss(enc[1]):
      counts["dropped"] += 1  # nothing to learn (e.g. empty text)
      continue
    out.append({"tokens": enc[0], "mask": enc[1]})
  counts["examples"] = len(out)
  if not out:
    raise io.DataError(f"{src['path']}: no usable examples ({counts['dropped']} of "
                       f"{len(rows)} dropped by length policy {policy!r}, max_length="
                       f"{max_length})")
  if len(_CACHE) > 16:
    _CACHE.clear()
  _CACHE[key] = (out, counts)
  return out, counts
