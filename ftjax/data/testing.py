"""A tiny offline char-level tokenizer (with a chat template) and JSONL writer for tests."""

from __future__ import annotations

import json
import os
import string
from typing import Iterable

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# Renders bos itself (so the pipeline must not add a second one); every turn ends with <eos>,
# which is therefore an assistant (loss) token and teaches the model to stop.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}"
                 "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}a:{% endif %}")


def make_tokenizer(path: str, chat_template: str = CHAT_TEMPLATE, pad: bool = True) -> str:
  """Saves a PreTrainedTokenizerFast to `path`: <pad>=0 <bos>=1 <eos>=2 <unk>=3, then chars.

  pad=False leaves the pad token unset (as in many base-model tokenizers)."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  chars = [c for c in string.printable if c not in "\x0b\x0c"]
  vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
  tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
  tk.decoder = decoders.Fuse()  # chars join without spaces
  fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>" if pad else None,
                                 bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
  fast.chat_template = chat_template
  os.makedirs(path, exist_ok=True)
  fast.save_pretrained(path)
  return path


def write_jsonl(path: str, rows: Iterable[dict]) -> str:
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return path
