"""grain pipeline: seeded shuffle/repeat/mix of example ids -> first-fit packed (or padded)
rows -> global batches -> this process's rows.

Multi-host determinism: every process builds the SAME seeded global pipeline (cheap at our
data sizes: examples are tokenised once, in memory) and keeps rows
[p * B / P, (p + 1) * B / P) of each global batch. So the global batch, and hence the loss,
is identical whatever the process count, and a checkpointed iterator state (which describes
the global stream) can be restored under a different process count.

Reused by ftjax/data/preference.py: `mixed_source`, `shift_targets`, `pad_batch`,
`SlicingIterator`.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional, Sequence

import grain
import numpy as np

Batch = Dict[str, np.ndarray]
_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # data is already in memory


def _seed(seed: int, i: int) -> int:
  return (int(seed) * 1_000_003 + 7919 * i) % (2**32)


def mixed_ids(sizes: Sequence[int], weights: Optional[Sequence[float]], *, seed: int,
              shuffle: bool, num_epochs: Optional[int], mix: bool = True) -> grain.MapDataset:
  """A MapDataset of global example ids (source k owns ids [sum(sizes[:k]), ... + sizes[k])).

  mix=True (training): each source is shuffled (reshuffled every epoch) and repeated, then
  sources are interleaved by `weights` with grain's MapDataset.mix, so an imbalanced mixture
  follows the weights exactly. With finite num_epochs a mixture ends when any source is
  exhausted (grain semantics). mix=False (eval): sources are concatenated in order, so every
  example is seen once per epoch. Ids rather than arrays flow through grain: it is cheaper.
  """
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
  if not mix or len(sizes) == 1:
    ds = grain.MapDataset.range(int(offsets[-1]))
    if shuffle:
      ds = ds.shuffle(seed=_seed(seed, 0))
    return ds.repeat(num_epochs)
  parts = []
  for i in range(len(sizes)):
    ds = grain.MapDataset.range(int(offsets[i]), int(offsets[i + 1]))
    if shuffle:
      ds = ds.shuffle(seed=_seed(seed, i))
    parts.append(ds.repeat(num_epochs))
  return grain.MapDataset.mix(parts, [float(w) for w in weights])


def mixed_source(per_source: Sequence[List[Any]], weights: Optional[Sequence[float]], *,
                 seed: int, shuffle: bool, num_epochs: Optional[int],
                 mix: bool = True) -> grain.MapDataset:
  """mixed_ids, mapped to the elements themselves (see mixed_ids for the semantics)."""
  flat = [e for src in per_source for e in src]
  ids = mixed_ids([len(s) for s in per_source], weights, seed=seed, shuffle=shuffle,
                  num_epochs=num_epochs, mix=mix)
  return ids.map(lambda i: flat[i])


def pack_examples(examples: Sequence[Dict[str, np.ndarray]], seq_len: int, pad_id: int,
                  features: Sequence[str] = ("tokens", "mask")) -> Batch:
  """Greedy first-fit of examples (in order) into as many rows of seq_len as needed.

  Returns each feature [R, T] (first feature padded with pad_id, others 0) plus segment_ids
  (1..k per row, 0 = padding) and positions (restarting at 0 per segment).
  """
  first = features[0]
  lengths = np.fromiter((len(e[first]) for e in examples), np.int64, len(examples))
  if lengths.max(initial=0) > seq_len:
    raise ValueError(f"packing: an example of {lengths.max()} tokens exceeds seq_len={seq_len}")
  room = np.zeros(len(examples), np.int64)  # free slots per row; at most one row per example
  nseg = np.zeros(len(examples), np.int64)
  place = []  # (row, offset, segment id) per example
  nrows = 0
  for n in lengths:
    fits = np.flatnonzero(room[:nrows] >= n)
    r = int(fits[0]) if fits.size else nrows
    if r == nrows:
      room[r], nrows = seq_len, nrows + 1
    nseg[r] += 1
    place.append((r, seq_len - room[r], nseg[r]))
    room[r] -= n
  out = {f: np.full((nrows, seq_len), pad_id if f == first else 0, np.int32) for f in features}
  out["segment_ids"] = np.zeros((nrows, seq_len), np.int32)
  out["positions"] = np.zeros((nrows, seq_len), np.int32)
  ar = np.arange(seq_len, dtype=np.int32)
  for e, n, (r, o, sid) in zip(examples, lengths, place):
    for f in features:
      out[f][r, o:o + n] = e[f]
    out["segment_ids"][r, o:o + n] = sid
    out["positions"][r, o:o + n] = ar[:n]
  return out


class _PackIterator(grain.DatasetIterator):
  """Pulls `window` example ids, first-fit packs them, emits the rows one by one.

  State = (parent state at the window start, rows already emitted): restoring re-reads and
  re-packs that window deterministically, so resumption is exact and the state stays small.
  """

  def __init__(self, parent, examples, seq_len, window, pad_id, features):
    super().__init__(parent)
    self._examples, self._seq_len, self._window = examples, seq_len, window
    self._pad_id, self._features = pad_id, features
    self._rows, self._start, self._next = None, None, 0

  def _exhausted_window(self) -> bool:
    return self._rows is None or self._next >= self._rows["segment_ids"].shape[0]

  def _fill(self):
    self._start = copy.deepcopy(self._parent.get_state())
    ids = []
    for _ in range(self._window):
      try:
        ids.append(next(self._parent))
      except StopIteration:
        break
    if not ids:
      raise StopIteration
    self._rows = pack_examples([self._examples[i] for i in ids], self._seq_len, self._pad_id,
                               self._features)
    self._next = 0

  def __next__(self):
    if self._exhausted_window():
      self._fill()
    row = {k: v[self._next] for k, v in self._rows.items()}
    self._next += 1
    return row

  def get_state(self):
    if self._exhausted_window():
      return {"parent": copy.deepcopy(self._parent.get_state()), "next_row": 0}
    return {"parent": copy.deepcopy(self._start), "next_row": self._next}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._rows, self._next = None, 0
    if state["next_row"]:
      self._fill()
      self._next = int(state["next_row"])


class PackIterDataset(grain.IterDataset):
  """grain IterDataset of packed rows from an IterDataset of ids into `examples`."""

  def __init__(self, parent: grain.IterDataset, examples: Sequence[Dict[str, np.ndarray]], *,
               seq_len: int, window: int, pad_id: int,
               features: Sequence[str] = ("tokens", "mask")):
    super().__init__(parent)
    self._args = (examples, seq_len, int(window), pad_id, tuple(features))

  def __iter__(self):
    return _PackIterator(self._parent.__iter__(), *self._args)


def pack_rows(ids: grain.MapDataset, examples, seq_len: int, window: int, pad_id: int,
              features: Sequence[str] = ("tokens", "mask")) -> grain.IterDataset:
  """Packed rows (see pack_examples) over windows of `window` consecutive ids of `ids`."""
  return PackIterDataset(ids.to_iter_dataset(_READ), examples, seq_len=seq_len, window=window,
                         pad_id=pad_id, features=features)


def pad_rows(ids: grain.MapDataset, examples, seq_len: int, pad_id: int,
             features: Sequence[str] = ("tokens", "mask")) -> grain.IterDataset:
  """One example per row, right-padded to seq_len (segment id 1, padding 0)."""
  return ids.map(lambda i: {k: v[0] for k, v in pack_examples(
      [examples[i]], seq_len, pad_id, features).items()}).to_iter_dataset(_READ)


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
