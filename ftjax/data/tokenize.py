"""Tokenisation of the three example formats into (ids, loss-token mask), and length policies.

An encoded example is `(ids int32[n], mask int32[n])` where mask[i] = 1 iff token i is a token
the model must learn to produce (a completion / assistant token, or every token for "text").
The pipeline turns this into next-token targets (loss at position i is mask[i + 1]).

Formats (auto-detected by fields):
  sft:      {"prompt": str, "completion": str}  ->  bos + prompt | completion + eos
            (conversational {"prompt": [msgs], "completion": [msgs]} is rendered as messages,
             with loss on the completion's assistant turns only)
  messages: {"messages": [{"role", "content"}, ...]} rendered with the tokenizer's chat
            template; loss exactly on the characters apply_chat_template renders for
            assistant turns (found by rendering prefixes)
  text:     {"text": str}  ->  bos + text + eos, loss on every token
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ftjax.data.io import DataError

FORMATS = ("auto", "sft", "messages", "text")
POLICIES = ("truncate", "drop", "error")
Encoded = Tuple[np.ndarray, np.ndarray]


def asset_path(rel: str) -> str:
  """Absolute path of a file shipped inside the installed ftjax package (ftjax/assets/...)."""
  import ftjax  # pylint: disable=g-import-not-at-top
  return os.path.join(os.path.dirname(os.path.abspath(ftjax.__file__)), "assets", rel)


def load_tokenizer(path: Optional[str] = None):
  """HF tokenizer from a local dir (None/"" = the shipped ftjax/assets/tokenizer); no remote code.

  A missing pad token is set to eos so right-padding works.
  """
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  path = str(path) if path else asset_path("tokenizer")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config.data.tokenizer: tokenizer directory not found: {path}")
  tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
  if tok.pad_token_id is None:
    if tok.eos_token is None:
      raise ValueError(f"tokenizer {path}: has neither a pad nor an eos token")
    tok.pad_token = tok.eos_token
  return tok


def detect_format(row: Dict[str, Any], where: str, fmt: str = "auto") -> str:
  """The row's format ('sft' | 'messages' | 'text'); DataError naming the missing fields."""
  if fmt not in FORMATS:
    raise ValueError(f"data format {fmt!r} unknown (expected one of {FORMATS})")
  required = {"sft": ("prompt", "completion"), "messages": ("messages",), "text": ("text",)}
  if fmt == "auto":
    for name in ("messages", "sft", "text"):
      if all(k in row for k in required[name]):
        return name
    raise DataError(f"{where}: cannot detect the format from fields {sorted(row)}; expected "
                    "'prompt'+'completion', 'messages' or 'text'")
  missing = [k for k in required[fmt] if k not in row]
  if missing:
    raise DataError(f"{where}: missing field {missing[0]!r} (format {fmt!r}; row has "
                    f"{sorted(row)})")
  return fmt


def _str_field(row, key, where) -> str:
  v = row[key]
  if not isinstance(v, str):
    raise DataError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
  return v


def _text_ids(tok, text: str) -> List[int]:
  return list(tok(text, add_special_tokens=False)["input_ids"])


def _bos(tok) -> List[int]:
  return [tok.bos_token_id] if tok.bos_token_id is not None else []


def _eos(tok) -> List[int]:
  return [tok.eos_token_id] if tok.eos_token_id is not None else []


def encode_example(tok, row: Dict[str, Any], where: str, fmt: str = "auto") -> Encoded:
  """(ids, mask) for one row; see the module docstring for what each format produces."""
  return encode_many(tok, [(row, where)], fmt)[0]


def encode_many(tok, rows: List[Tuple[Dict[str, Any], str]], fmt: str = "auto") -> List[Encoded]:
  """encode_example over (row, where) pairs. Plain-string rows are tokenised in one batched
  call (the fast tokenizer is ~10x quicker that way); "text" is a prompt-less completion."""
  out: List[Optional[Encoded]] = [None] * len(rows)
  plain = []  # (row index, prompt, completion)
  for i, (row, where) in enumerate(rows):
    f = detect_format(row, where, fmt)
    if f == "text":
      plain.append((i, "", _str_field(row, "text", where)))
    elif f == "sft" and not isinstance(row["prompt"], list):
      plain.append((i, _str_field(row, "prompt", where), _str_field(row, "completion", where)))
    elif f == "sft":  # conversational prompt/completion: loss on the completion's turns
      prompt = _messages(row["prompt"], where, "prompt")
      msgs = prompt + _messages(row["completion"], where, "completion")
      out[i] = encode_messages(tok, msgs, where, loss_from=len(prompt))[:2]
    else:
      out[i] = encode_messages(tok, _messages(row["messages"], where, "messages"), where)[:2]
  if plain:
    bos, eos = _bos(tok), _eos(tok)
    prompts = _batch_ids(tok, [p for _, p, _ in plain])
    completions = _batch_ids(tok, [c for _, _, c in plain])
    for (i, _, _), p, c in zip(plain, prompts, completions):
      p, c = bos + p, c + eos
      out[i] = (np.asarray(p + c, np.int32), np.asarray([0] * len(p) + [1] * len(c), np.int32))
  return out


def _batch_ids(tok, texts: List[str]) -> List[List[int]]:
  return [list(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]


def encode_prompt(tok, example: Dict[str, Any]) -> List[int]:
  """Prompt token ids exactly as they precede the (last) completion in training.

  For messages: every token before the last assistant turn's content (its generation header
  included), or, if the conversation does not end with an assistant turn, the conversation
  rendered with add_generation_prompt=True.
  """
  where = "encode_prompt example"
  if "messages" in example:
    msgs, loss_from = _messages(example["messages"], where, "messages"), 0
  elif "prompt" in example:
    if not isinstance(example["prompt"], list):
      return _bos(tok) + _text_ids(tok, _str_field(example, "prompt", where))
    msgs = _messages(example["prompt"], where, "prompt")
    loss_from = len(msgs)
    if isinstance(example.get("completion"), list):
      msgs = msgs + _messages(example["completion"], where, "completion")
  else:
    raise DataError(f"{where}: needs a 'prompt' or 'messages' field, got {sorted(example)}")
  if msgs[-1]["role"] == "assistant" and len(msgs) > loss_from:
    ids, _, starts = encode_messages(tok, msgs, where, loss_from)
    return [int(i) for i in ids[:starts[0 if loss_from else -1]]]
  return _text_ids(tok, _render(tok, msgs, True, where))


def _messages(msgs, where: str, field: str) -> List[Dict[str, str]]:
  if not isinstance(msgs, (list, tuple)) or not msgs:
    raise DataError(f"{where}: field {field!r} must be a non-empty list of messages")
  out = []
  for i, m in enumerate(msgs):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
        m.get("content"), str):
      raise DataError(f"{where}: {field}[{i}] must be an object with string 'role' and "
                      f"'content', got {m!r:.80}")
    out.append({"role": m["role"], "content": m["content"]})
  return out


def _render(tok, msgs, gen: bool, where: str) -> str:
  if not getattr(tok, "chat_template", None):
    raise DataError(f"{where}: messages need a tokenizer with a chat_template")
  return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def _assistant_spans(tok, msgs, full: str, where: str, loss_from: int):
  """Char spans [start, end) of assistant turns in `full`, via rendered prefixes."""
  spans = []
  for i, m in enumerate(msgs):
    if m["role"] != "assistant" or i < loss_from:
      continue
    before = _render(tok, msgs[:i], True, where) if i else ""
    through = _render(tok, msgs[:i + 1], False, where)
    if not (through.startswith(before) and full.startswith(through)):
      raise DataError(f"{where}: the chat template does not render conversation prefixes as "
                      f"prefixes (turn {i}); cannot locate the assistant tokens")
    spans.append((len(before), len(through)))
  if not spans:
    raise DataError(f"{where}: no assistant turn to train on")
  return spans


def _token_spans(tok, full: str, spans, where: str):
  """(ids of `full`, [start, end) token spans of the char spans)."""
  try:
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    starts = [s for s, _ in enc["offset_mapping"]]
  except (NotImplementedError, ValueError, TypeError):  # tokenizers without offsets
    enc, starts = tok(full, add_special_tokens=False), None
  ids = list(enc["input_ids"])
  if starts is not None:
    first = lambda c: next((j for j, s in enumerate(starts) if s >= c), len(ids))
    return ids, [(first(a), first(b)) for a, b in spans]
  out = []
  for a, b in spans:  # each rendered prefix must tokenise to a prefix of the whole
    pa, pb = _text_ids(tok, full[:a]), _text_ids(tok, full[:b])
    if pa != ids[:len(pa)] or pb != ids[:len(pb)]:
      raise DataError(f"{where}: assistant turn boundaries split a token; cannot mask exactly")
    out.append((len(pa), len(pb)))
  return ids, out


def encode_messages(tok, msgs, where: str, loss_from: int = 0):
  """(ids, mask, token index where each trained assistant span starts) for a conversation."""
  full = _render(tok, msgs, False, where)
  ids, tspans = _token_spans(tok, full, _assistant_spans(tok, msgs, full, where, loss_from),
                             where)
  # The chat template is the authority on bos: exactly what apply_chat_template renders.
  mask = np.zeros(len(ids), np.int32)
  for a, b in tspans:
    mask[a:b] = 1
  return np.asarray(ids, np.int32), mask, [a for a, _ in tspans]


def apply_length_policy(enc: Encoded, max_length: int, policy: str, where: str):
  """(enc or None, status) with status 'ok' | 'truncated' | 'dropped'.

  'truncate' cuts on the right; an example left with no loss target (prompt alone fills
  max_length) is dropped instead, since it would contribute nothing. 'error' raises DataError.
  """
  if policy not in POLICIES:
    raise ValueError(f"config.data.truncation: {policy!r} unknown (expected one of {POLICIES})")
  ids, mask = enc
  if len(ids) <= max_length:
    return enc, "ok"
  if policy == "error":
    raise DataError(f"{where}: example is {len(ids)} tokens, longer than max_length="
                    f"{max_length} (config.data.truncation='error')")
  if policy == "drop":
    return None, "dropped"
  ids, mask = ids[:max_length], mask[:max_length]
  if mask[1:].sum() == 0:
    return None, "dropped"
  return (ids, mask), "truncated"


def has_loss(mask: np.ndarray) -> bool:
  """Position 0 is never a target, so a loss token must sit at index >= 1."""
  return bool(np.asarray(mask)[1:].sum() > 0)

