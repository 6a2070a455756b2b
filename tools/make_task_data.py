"""Writes the shipped default task's JSONL splits to ftjax/assets/data/arithmetic (committed).

  python tools/make_task_data.py [--digits 2] [--out ftjax/assets/data/arithmetic]

train / preference_train / kto_train never contain a held-out (test) pair.
"""

import argparse
import json
import os

from ftjax.tasks import arithmetic as task


def _write(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  print(f"wrote {path}: {len(rows)} rows")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--digits", type=int, default=2)
  ap.add_argument("--out", default="ftjax/assets/data/arithmetic")
  ap.add_argument("--train", type=int, default=20000)
  ap.add_argument("--test", type=int, default=500)
  ap.add_argument("--pref", type=int, default=5000)
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  held = task.held_out_pairs(args.test, digits=args.digits)
  _write(os.path.join(args.out, "train.jsonl"),
         task.generate(args.train, seed=0, digits=args.digits, exclude=held))
  _write(os.path.join(args.out, "test.jsonl"),
         [{"prompt": task.prompt_of(a, b), "completion": str(a + b)} for a, b in held])
  _write(os.path.join(args.out, "preference_train.jsonl"),
         task.generate_preferences(args.pref, seed=1, digits=args.digits, exclude=held))
  _write(os.path.join(args.out, "preference_test.jsonl"),
         task.generate_preferences(len(held), seed=2, digits=args.digits, pairs=held))
  _write(os.path.join(args.out, "kto_train.jsonl"),
         task.generate_unpaired(args.pref, seed=3, digits=args.digits, exclude=held))


if __name__ == "__main__":
  main()
