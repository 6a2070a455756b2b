"""Data pipeline: files -> tokenised examples -> packed/padded rows -> per-process batches.

Public API (used by the train loop, eval and the preference pipeline):
  default_config()                    config.data section with defaults
  load_tokenizer(path_or_None)        local HF tokenizer (None = shipped ftjax/assets/tokenizer)
  build_iterator(data_cfg, tok, ...)  grain iterator of batches, with get_state/set_state/stats
  load_examples(data_cfg, split)      raw rows (eval generation)
  encode_prompt(tok, example)         prompt ids exactly as they precede the completion
Helpers for other pipelines: io.read_rows / io.DataError, tokenize.encode_example /
encode_many / apply_length_policy, sources.sources / encode_source, pipeline.mixed_ids /
mixed_source / pack_examples / pack_rows / pad_rows / shift_targets / SlicingIterator.
Test helpers (tiny offline tokenizer with a chat template, JSONL writer): ftjax.data.testing.
"""

from __future__ import annotations

from typing import Optional

import ml_collections

from ftjax.data import io, pipeline, sources, tokenize
from ftjax.data.io import DataError, read_rows
from ftjax.data.sources import load_examples
from ftjax.data.tokenize import asset_path, encode_example, encode_prompt, load_tokenizer


def default_config() -> ml_collections.ConfigDict:
  """config.data defaults: the shipped arithmetic task and tokenizer.

  train / eval: sources, each {"path", "weight" (mixture weight), "format", "split" (hub only)}
  or a plain path. max_length: per-example cap (None = train.seq_len). truncation: 'truncate'
  (cut right) | 'drop' | 'error'. packing: first-fit several examples per row.
  packing_window: examples are first-fit packed in windows of this many consecutive examples
  (larger = less padding in each window's last rows; the window's rows are emitted in order).
  """
  c = ml_collections.ConfigDict()
  c.tokenizer = ml_collections.config_dict.placeholder(str)
  c.train = ({"path": asset_path("data/arithmetic/train.jsonl"), "weight": 1.0,
              "format": "auto"},)
  c.eval = ({"path": asset_path("data/arithmetic/test.jsonl"), "weight": 1.0,
             "format": "auto"},)
  c.max_length = ml_collections.config_dict.placeholder(int)
  c.truncation = "truncate"
  c.packing = True
  c.packing_window = 1024
  c.shuffle = True
  c.format = "auto"
  return c


def _max_length(data_cfg, seq_len: int) -> int:
  m = data_cfg.get("max_length") or seq_len
  if m > seq_len:
    raise ValueError(f"config.data.max_length={m} exceeds train.seq_len={seq_len}")
  return int(m)


def build_iterator(data_cfg, tokenizer, *, split: str, global_batch_size: int, seq_len: int,
                   seed: int, process_index: int = 0, process_count: int = 1,
                   num_epochs: Optional[int] = None) -> pipeline.SlicingIterator:
  """Iterator of dicts of numpy arrays [global_batch_size // process_count, seq_len]:

  tokens int32, targets int32 (next token in the same segment, pad elsewhere), loss_mask
  float32 (1 where the target is a completion token), segment_ids int32 (1..k, 0 = padding),
  positions int32 (restart at 0 per segment).

  split 'train' mixes sources by weight and shuffles (config.data.shuffle); 'eval' concatenates
  sources in file order, unshuffled. num_epochs=None repeats forever; with a finite count the
  last partial global batch is padded with all-padding rows (loss_mask 0), then StopIteration.
  Every process builds the same global stream and keeps its slice of rows (see pipeline.py).

  `.stats`: examples / truncated / dropped (usable, cut, and discarded examples of the split,
  fixed at build time; discarded = over-long under 'drop', or no target left), plus running
  counts over the global batches yielded so far (not restored by set_state): batches, tokens
  (non-padding), loss_tokens, row_slots (tokens / row_slots = packing efficiency).
  """
  srcs = sources.sources(data_cfg, split)
  max_length = _max_length(data_cfg, seq_len)
  policy = data_cfg.get("truncation", "truncate")
  pad_id = int(tokenizer.pad_token_id or 0)
  per_source, stats = [], {"examples": 0, "truncated": 0, "dropped": 0}
  for src in srcs:
    elems, counts = sources.encode_source(tokenizer, src, max_length, policy)
    per_source.append(elems)
    for k, v in counts.items():
      stats[k] += v
  train = split == "train"
  examples = [e for src in per_source for e in src]
  ids = pipeline.mixed_ids([len(e) for e in per_source], [s["weight"] for s in srcs],
                           seed=seed, shuffle=train and bool(data_cfg.get("shuffle", True)),
                           num_epochs=num_epochs, mix=train)
  if data_cfg.get("packing", True):
    window = int(data_cfg.get("packing_window", 1024))
    if window < 1:
      raise ValueError(f"config.data.packing_window must be >= 1, got {window}")
    rows = pipeline.pack_rows(ids, examples, seq_len, window, pad_id)
  else:
    rows = pipeline.pad_rows(ids, examples, seq_len, pad_id)
  pads = {"tokens": pad_id, "targets": pad_id}
  batches = rows.batch(global_batch_size).map(
      lambda b: pipeline.pad_batch(pipeline.shift_targets(b, pad_id), global_batch_size, pads))
  return pipeline.SlicingIterator(batches, process_index=process_index,
                                  process_count=process_count,
                                  global_batch_size=global_batch_size, stats=stats,
                                  count_fn=_count)


def _count(batch):
  return {"batches": 1, "tokens": int((batch["segment_ids"] > 0).sum()),
          "loss_tokens": int(batch["loss_mask"].sum()), "row_slots": batch["tokens"].size}
