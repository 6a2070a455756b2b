"""Reading raw rows from local JSONL / JSON / Parquet / CSV files (or HF hub names).

JSONL, JSON and CSV are parsed here (exact line numbers, string values); Parquet and hub
names go through HF `datasets`.

Every row comes back with a `where` string ("path:line 12" or "path row 5") so that any later
error (missing field, too long, bad type) can name the exact place in the input. Reused by
ftjax/data/preference.py.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, List, Tuple

Row = Dict[str, Any]
Located = Tuple[Row, str]  # (row, where)

_LOCAL_EXTS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
               ".csv": "csv"}


class DataError(ValueError):
  """Bad input data; the message names the file and line/row (and field) at fault."""


def _is_local(path: str) -> bool:
  return (os.path.exists(path) or os.path.splitext(path)[1].lower() in _LOCAL_EXTS
          or path.startswith(("/", ".", "~")))


def read_rows(path: str, split: str = "train") -> List[Located]:
  """All rows of one source as (row_dict, where). Raises DataError / FileNotFoundError.

  Local files are read by extension; anything that does not look like a local path is passed
  to `datasets.load_dataset(path, split=split)` (hub names; never used in tests).
  """
  path = os.path.expanduser(str(path))
  if not _is_local(path):
    return _read_hub(path, split)
  if not os.path.exists(path):
    raise FileNotFoundError(f"data file not found: {path}")
  kind = _LOCAL_EXTS.get(os.path.splitext(path)[1].lower())
  if kind is None:
    raise DataError(f"{path}: unsupported data file extension (expected one of "
                    f"{sorted(_LOCAL_EXTS)})")
  if kind == "jsonl":
    rows = read_jsonl(path)
  elif kind == "json":
    rows = _read_json(path)
  elif kind == "csv":
    rows = _read_csv(path)
  else:
    rows = _read_with_datasets(kind, path)
  if not rows:
    raise DataError(f"{path}: dataset is empty (no rows)")
  return rows


def read_jsonl(path: str) -> List[Located]:
  """Validates every line ourselves so a malformed line is reported as file:line."""
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{n}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
      out.append((row, where))
  return out


def _read_json(path: str) -> List[Located]:
  """A JSON array of objects (or {"data": [...]}); otherwise try it as JSON lines."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  try:
    doc = json.loads(text)
  except json.JSONDecodeError:
    return read_jsonl(path)  # many ".json" files are really JSON lines
  if isinstance(doc, dict) and isinstance(doc.get("data"), list):
    doc = doc["data"]
  if isinstance(doc, dict):  # a single object on one line
    doc = [doc]
  if not isinstance(doc, list):
    raise DataError(f"{path}: expected a JSON array of objects, got {type(doc).__name__}")
  out = []
  for i, row in enumerate(doc):
    if not isinstance(row, dict):
      raise DataError(f"{path} row {i}: expected a JSON object, got {type(row).__name__}")
    out.append((row, f"{path} row {i}"))
  return out


def _read_csv(path: str) -> List[Located]:
  """CSV via the stdlib so every value stays a string (pandas would turn "4" into 4)."""
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f)
    out = []
    for row in reader:
      if None in row:  # more values than header columns
        raise DataError(f"{path}:{reader.line_num}: more values than header columns")
      out.append((dict(row), f"{path}:{reader.line_num}"))
  return out


def _read_with_datasets(kind: str, path: str) -> List[Located]:
  import datasets  # pylint: disable=g-import-not-at-top  # slow import; only when needed
  try:
    ds = datasets.load_dataset(kind, data_files=path, split="train")
  except Exception as e:  # pylint: disable=broad-except  # re-raised with the file name
    raise DataError(f"{path}: could not read as {kind}: {e}") from e
  return [(dict(row), f"{path} row {i}") for i, row in enumerate(ds)]


def _read_hub(name: str, split: str) -> List[Located]:
  import datasets  # pylint: disable=g-import-not-at-top
  ds = datasets.load_dataset(name, split=split)
  rows = [(dict(row), f"{name}[{split}] row {i}") for i, row in enumerate(ds)]
  if not rows:
    raise DataError(f"{name}[{split}]: dataset split is empty")
  return rows
