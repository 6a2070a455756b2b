"""The shipped default: SFT of a ~0.8M-parameter Llama-style decoder on multi-digit addition.

  ftjax train --config configs/sft_tiny.py --workdir runs/sft_tiny

Learns visibly on 2 CPU cores in a few minutes: 600 steps x 32 packed rows x 64 tokens
(~8 examples per row, ~150k examples ~ 7 epochs of the 20k-example train split). Held-out
exact match is measured on 200 unseen sums by greedy decoding. Variants ride on the arg:
  --config configs/sft_tiny.py:steps=100        (a quick smoke run)
Anything else is a flag: --config.optim.lr=3e-3 --config.train.batch_size=64 ...
"""

from ftjax.config import base_config, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, steps=600)
  c = base_config()
  c.model.update(dict(vocab_size=128, hidden_size=128, intermediate_size=352, num_layers=4,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=256))
  c.data.packing = True
  c.train.update(dict(steps=a.steps, batch_size=32, seq_len=64, log_every=20))
  c.optim.update(dict(lr=3e-3, warmup_steps=30, schedule="cosine", weight_decay=0.01))
  c.eval.update(dict(every=max(a.steps // 3, 1), batches=4, batch_size=32,
                     exact_match_examples=200, max_new_tokens=5))
  c.checkpoint.update(dict(every=200, keep=2))
  return c
