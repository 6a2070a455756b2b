"""Streaming safetensors reading and writing (single file or sharded with an index).

Why not `safetensors.safe_open`: it memory-maps whole files, and the mapped pages count towards
resident memory until the file is closed, so a load would peak at checkpoint + model. Here each
tensor is read with `readinto` straight into its destination buffer; writing streams tensor by
tensor after a header computed from shapes alone. The format is the documented one
(8-byte little-endian header size, JSON header, raw little-endian data), so files interoperate
with `safetensors` and transformers.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import ml_dtypes
import numpy as np

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 << 20  # the reference implementation's limit


class TensorInfo:
  __slots__ = ("file", "dtype", "shape", "start", "end")

  def __init__(self, file, dtype, shape, start, end):
    self.file, self.dtype, self.shape, self.start, self.end = file, dtype, shape, start, end


def read_header(path: str) -> Dict[str, TensorInfo]:
  """Tensor name -> (dtype, shape, absolute byte range) of one safetensors file."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > _MAX_HEADER or 8 + n > size:
      raise ValueError(f"{path}: corrupt safetensors header size {n}")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
  out = {}
  for name, h in header.items():
    if name == "__metadata__":
      continue
    if h.get("dtype") not in _DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {h.get('dtype')!r}")
    dtype = np.dtype(_DTYPES[h["dtype"]])
    shape = tuple(int(s) for s in h["shape"])
    begin, end = (int(o) for o in h["data_offsets"])
    if end - begin != math.prod(shape) * dtype.itemsize or 8 + n + end > size:
      raise ValueError(f"{path}: tensor {name!r} has inconsistent data_offsets {begin, end} "
                       f"for shape {shape} {h['dtype']} (file truncated?)")
    out[name] = TensorInfo(path, dtype, shape, 8 + n + begin, 8 + n + end)
  return out


def checkpoint_index(model_dir: str) -> Dict[str, TensorInfo]:
  """Every tensor of an HF dir, via model.safetensors.index.json or else all *.safetensors."""
  index_path = os.path.join(model_dir, INDEX_NAME)
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index_path}: no 'weight_map' object")
    files = sorted(set(weight_map.values()))
  else:
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    weight_map = None
  if not files:
    others = [f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    hint = f" (found {others}: pickle checkpoints are not loaded; re-save with " \
           "save_pretrained(safe_serialization=True))" if others else ""
    raise FileNotFoundError(f"{model_dir}: no *.safetensors weights{hint}")
  tensors: Dict[str, TensorInfo] = {}
  for fname in files:
    path = os.path.join(model_dir, fname)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{index_path}: lists {fname}, which does not exist")
    for name, info in read_header(path).items():
      if name in tensors:
        raise ValueError(f"{model_dir}: tensor {name!r} is in both {tensors[name].file} and {path}")
      tensors[name] = info
  if weight_map is not None:
    for name, fname in weight_map.items():
      if name not in tensors:
        raise ValueError(f"{index_path}: tensor {name!r} is not in {fname}")
  return tensors


class Reader:
  """Reads tensors by name with plain file reads (no mmap); keeps a few files open."""

  def __init__(self, tensors: Dict[str, TensorInfo]):
    self.tensors = tensors
    self._files = {}

  def read(self, name: str, out: Optional[np.ndarray] = None) -> np.ndarray:
    info = self.tensors[name]
    if out is None or out.dtype != info.dtype or not out.flags.c_contiguous:
      out = np.empty(info.shape, info.dtype)
    f = self._files.get(info.file)
    if f is None:
      f = self._files[info.file] = open(info.file, "rb", buffering=0)
    f.seek(info.start)
    view = memoryview(out.reshape(-1).view(np.uint8))
    got = 0
    while got < len(view):
      n = f.readinto(view[got:])
      if not n:
        raise ValueError(f"{info.file}: tensor {name!r} truncated")
      got += n
    return out

  def close(self):
    for f in self._files.values():
      f.close()
    self._files.clear()

  def __enter__(self):
    return self

  def __exit__(self, *a):
    self.close()


def _header_bytes(entries: List[Tuple[str, np.dtype, Tuple[int, ...]]]) -> bytes:
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, dtype, shape in entries:
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {"dtype": _CODES[dtype], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8-byte alignment
  return struct.pack("<Q", len(raw)) + raw


def plan_shards(entries: List[Tuple[str, np.dtype, Tuple[int, ...]]], shard_size_bytes: int):
  """Groups (name, dtype, shape) in order into shards of at most shard_size_bytes (>= 1 tensor)."""
  shards, cur, size = [], [], 0
  for e in entries:
    nbytes = math.prod(e[2]) * e[1].itemsize
    if cur and size + nbytes > shard_size_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append(e)
    size += nbytes
  if cur or not shards:
    shards.append(cur)
  return shards


def write_checkpoint(out_dir: str, entries, produce: Iterable[np.ndarray],
                     shard_size_bytes: int) -> List[str]:
  """Writes tensors (in `entries` order, produced lazily) as safetensors shards + index.

  entries: [(name, dtype, shape)]; `produce` yields the matching arrays one at a time, so only
  one tensor is on the host at once. Returns the written file names.
  """
  entries = [(n, np.dtype(d), tuple(s)) for n, d, s in entries]
  shards = plan_shards(entries, shard_size_bytes)
  names = ([SINGLE_NAME] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  it: Iterator[np.ndarray] = iter(produce)
  weight_map, total = {}, 0
  for fname, shard in zip(names, shards):
    with open(os.path.join(out_dir, fname), "wb") as f:
      f.write(_header_bytes(shard))
      for name, dtype, shape in shard:
        arr = np.ascontiguousarray(next(it))
        if arr.dtype != dtype or arr.shape != shape:
          raise ValueError(f"export: tensor {name!r} is {arr.dtype}{arr.shape}, "
                           f"planned {dtype}{shape}")
        f.write(memoryview(arr.reshape(-1).view(np.uint8)))
        weight_map[name] = fname
        total += arr.nbytes
  if len(shards) > 1:
    with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return names
