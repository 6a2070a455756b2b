"""Builds the shipped character-level tokenizer (ftjax/assets/tokenizer), committed to the repo.

  python tools/build_tokenizer.py [--out ftjax/assets/tokenizer]

Character level keeps the default task honest (every digit is one token) and needs no training
corpus. It is a standard HF `PreTrainedTokenizerFast` directory with a chat template, so the same
data code path serves the shipped default and real HF checkpoints.
"""

import argparse
import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARS = sorted(set(string.digits + string.ascii_letters + string.punctuation + " \n"))

# Each turn is `<|role|>content`; assistant turns end with <eos> so the model learns to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' + message['content'] + eos_token }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build() -> PreTrainedTokenizerFast:
  vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
  tok.decoder = decoders.Fuse()
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
      unk_token="<unk>", additional_special_tokens=SPECIAL[4:])
  fast.chat_template = CHAT_TEMPLATE
  fast.model_max_length = 4096
  return fast


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="ftjax/assets/tokenizer")
  args = ap.parse_args()
  tok = build()
  tok.save_pretrained(args.out)
  ids = tok("12+34=46")["input_ids"]
  assert tok.decode(ids) == "12+34=46", tok.decode(ids)
  print(f"wrote {args.out}: vocab {len(tok)}")


if __name__ == "__main__":
  main()
