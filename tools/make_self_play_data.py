"""Self-play (on-policy) preference pairs for DPO: the SFT model's own wrong answers rejected.

  python tools/make_self_play_data.py --sft runs/sft_tiny   # -> runs/sft_tiny/self_play_train.jsonl

Greedy-decodes every prompt of the shipped preference_train split (never a held-out prompt) with
the latest checkpoint of the SFT run, and keeps a pair (true sum, model's answer) wherever the
model is wrong (arithmetic.self_play_preferences). Greedy decoding is deterministic, so the file
is a function of the SFT run. configs/dpo_tiny.py mixes it with the static split.
"""

import argparse
import collections
import json
import os

import ml_collections

from ftjax import data
from ftjax.config import load_config
from ftjax.models import Decoder
from ftjax.tasks import arithmetic as task
from ftjax.train import evaluate, state as state_lib
from ftjax.train.checkpoint import Checkpointer

OUT_NAME = "self_play_train.jsonl"


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sft", default="runs/sft_tiny", help="SFT workdir (latest checkpoint)")
  ap.add_argument("--config", default="configs/sft_tiny.py", help="the SFT run's config")
  ap.add_argument("--prompts", default=data.asset_path(
      "data/arithmetic/preference_train.jsonl"))
  ap.add_argument("--out", default=None, help=f"default: <sft>/{OUT_NAME}")
  args = ap.parse_args()
  cfg = load_config(args.config)
  tok = data.load_tokenizer(cfg.data.get("tokenizer"))
  ck = Checkpointer(os.path.join(args.sft, "checkpoints"),
                    ml_collections.ConfigDict({"async_save": False}))
  trainable, frozen, _ = ck.restore_params()
  ck.close()
  with open(args.prompts) as f:
    rows = [json.loads(line) for line in f]
  texts = evaluate.greedy_completions(
      Decoder(state_lib.model_config(cfg, tok)), trainable, frozen, tok, rows,
      max_new_tokens=int(cfg.eval.max_new_tokens), batch_size=250)
  pairs = task.self_play_preferences(rows, texts)
  out = args.out or os.path.join(args.sft, OUT_NAME)
  with open(out, "w") as f:
    for p in pairs:
      f.write(json.dumps(p) + "\n")
  errs = collections.Counter(int(p["rejected"]) - int(p["chosen"]) for p in pairs
                             if p["rejected"].isdigit())
  print(f"wrote {out}: {len(pairs)} pairs from {len(rows)} prompts (greedy accuracy "
        f"{1 - len(pairs) / len(rows):.3f}); commonest errors (answer - sum): "
        f"{errs.most_common(6)}")


if __name__ == "__main__":
  main()
