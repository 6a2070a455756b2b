"""grain pipeline: seeded shuffle/repeat/mix of encoded examples -> packed or padded rows ->
global batches -> this process's rows.

Multi-host determinism: every process builds the SAME seeded global pipeline (cheap at our
data sizes: examples are tokenised once, in memory) and keeps rows
[p * B / P, (p + 1) * B / P) of each global batch. So the global batch, and hence the loss,
is identical whatever the process count, and a checkpointed iterator state (which describes
the global stream) can be restored under a different process count.

Reused by ftjax/data/preference.py: `mixed_source`, `SlicingIterator`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import grain
import numpy as np

Batch = Dict[str, np.ndarray]
_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # data is already in memory


def _seed(seed: int, i: int) -> int:
  return (int(seed) * 1_000_003 + 7919 * i) % (2**32)


def mixed_source(per_source: Sequence[List[Any]], weights: Optional[Sequence[float]], *,
                 seed: int, shuffle: bool, num_epochs: Optional[int],
                 mix: bool = True) -> grain.MapDataset:
  """One MapDataset over several sources' element lists.

  mix=True (training): each source is shuffled (reshuffled every epoch) and repeated, then
  sources are interleaved by `weights` with grain's MapDataset.mix, so an imbalanced mixture
  follows the weights exactly. With finite num_epochs a mixture ends when any source is
  exhausted (grain semantics). mix=False (eval): sources are concatenated in order, so every
  example is seen once per epoch.
  """
  if not mix or len(per_source) == 1:
    elems = [e for src in per_source for e in src]
    ds = grain.MapDataset.source(elems)
    if shuffle:
      ds = ds.shuffle(seed=_seed(seed, 0))
    return ds.repeat(num_epochs)
  parts = []
  for i, elems in enumerate(per_source):
    ds = grain.MapDataset.source(list(elems))
    if shuffle:
      ds = ds.shuffle(seed=_seed(seed, i))
    parts.append(ds.repeat(num_epochs))
  return grain.MapDataset.mix(parts, [float(w) for w in weights])


def pack_rows(ds: grain.MapDataset, seq_len: int, num_bins: int, pad_id: int,
              features: Sequence[str] = ("tokens", "mask")) -> grain.IterDataset:
  """Greedy first-fit packing into rows of seq_len (grain FirstFitPackIterDataset).

  Output per row: each feature [T] plus `segment_ids` (1..k, 0 = padding) and `positions`
  (restarting at 0 per segment), taken from the first feature.
  """
  it = ds.to_iter_dataset(_READ)
  lengths = {f: seq_len for f in features}
  padding = {f: (pad_id if f == features[0] else 0) for f in features}
  packed = grain.experimental.FirstFitPackIterDataset(
      it, length_struct=lengths, num_packing_bins=num_bins, shuffle_bins=False,
      padding_struct=padding)
  first = features[0]

  def rename(row):
    out = {f: row[f] for f in features}
    out["segment_ids"] = row[f"{first}_segment_ids"].astype(np.int32)
    out["positions"] = row[f"{first}_positions"].astype(np.int32)
    return out

  return packed.map(rename)


def pad_rows(ds: grain.MapDataset, seq_len: int, pad_id: int,
             features: Sequence[str] = ("tokens", "mask")) -> grain.IterDataset:
  """One example per row, right-padded to seq_len (segment id 1, padding 0)."""
  first = features[0]

  def pad(ex):
    n = len(ex[first])
    out = {}
    for f in features:
      row = np.full(seq_len, pad_id if f == first else 0, np.int32)
      row[:n] = ex[f]
      out[f] = row
    out["segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
    out["positions"] = np.where(np.arange(seq_len) < n, np.arange(seq_len), 0).astype(np.int32)
    return out

  return ds.map(pad).to_iter_dataset(_READ)


def shift_targets(rows: Batch, pad_id: int) -> Batch:
  """tokens/mask/segment_ids/positions [B, T] -> model batch with next-token targets.

  targets[t] = tokens[t + 1] inside a segment (pad_id at segment ends and padding);
  loss_mask[t] = mask[t + 1] inside a segment, i.e. 1 where the TARGET is a loss token.
  """
  tokens, seg = rows["tokens"].astype(np.int32), rows["segment_ids"].astype(np.int32)
  same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
  targets = np.full_like(tokens, pad_id)
  targets[:, :-1] = np.where(same, tokens[:, 1:], pad_id)
  loss_mask = np.zeros(tokens.shape, np.float32)
  loss_mask[:, :-1] = (rows["mask"][:, 1:] > 0) & same
  return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask, "segment_ids": seg,
          "positions": rows["positions"].astype(np.int32)}


def pad_batch(batch: Batch, batch_size: int, pad_values: Dict[str, int]) -> Batch:
  """Pads a final partial batch with all-padding rows (segment 0, loss_mask 0)."""
  n = next(iter(batch.values())).shape[0]
  if n == batch_size:
    return batch
  out = {}
  for k, v in batch.items():
    fill = np.full((batch_size - n,) + v.shape[1:], pad_values.get(k, 0), v.dtype)
    out[k] = np.concatenate([v, fill], axis=0)
  return out


class SlicingIterator:
  """Iterates global batches and yields this process's rows; grain state for checkpoints.

  get_state() is JSON-serialisable and describes the global stream, so it can be restored
  under any process count.
  """

  def __init__(self, ds: grain.IterDataset, *, process_index: int, process_count: int,
               global_batch_size: int, stats: Dict[str, Any],
               count_fn: Optional[Callable[[Batch], Dict[str, int]]] = None):
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} not in [0, process_count="
                       f"{process_count})")
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                       f"process_count={process_count}")
    self._ds = ds
    self._it = iter(ds)
    per = global_batch_size // process_count
    self._rows = slice(process_index * per, (process_index + 1) * per)
    self.stats = stats
    self._count_fn = count_fn

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    batch = next(self._it)
    if self._count_fn is not None:
      for k, v in self._count_fn(batch).items():
        self.stats[k] = self.stats.get(k, 0) + int(v)
    return {k: v[self._rows] for k, v in batch.items()}

  def get_state(self) -> Dict[str, Any]:
    return {"grain": self._it.get_state()}

  def set_state(self, state: Dict[str, Any]):
    if not isinstance(state, dict) or "grain" not in state:
      raise ValueError(f"data iterator state: expected {{'grain': ...}}, got {state!r:.200}")
    self._it = iter(self._ds)
    self._it.set_state(state["grain"])
