"""SFT of a local Hugging Face checkpoint dir (Llama, Mistral, Qwen2/3, Gemma/Gemma 2, GPT-2).

  ftjax train --config configs/sft_hf.py:path=/ckpt/Qwen2.5-0.5B-Instruct --workdir runs/qwen \
      --config.data.train='({"path": "my_chats.jsonl", "weight": 1.0},)'
  ftjax export --workdir runs/qwen --out runs/qwen/hf     # loadable by transformers

The architecture, weights and tokenizer (with its chat template) all come from `path`; only
numerics (dtype, param_dtype, remat_policy, ...) may be overridden under config.model.
Defaults are sized for a ~0.5B model on one accelerator: 16 rows x 1024 tokens = 16k tokens
per step, lr 1e-5 (full fine-tuning of a pretrained model wants a small lr). Data defaults to
the shipped arithmetic task ({"prompt", "completion"} rows work with any tokenizer).
  --config configs/sft_hf.py:path=DIR,steps=3   a smoke run
"""

from ftjax.config import base_config, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, path="", steps=1000)
  c = base_config()
  c.model.hf_path = a.path  # architecture + weights
  c.data.tokenizer = a.path or None  # tokenizer files + chat template live in the same dir
  c.data.packing = True
  c.train.update(dict(steps=a.steps, batch_size=16, seq_len=1024, log_every=10))
  c.optim.update(dict(lr=1e-5, warmup_steps=min(50, a.steps // 10), schedule="cosine",
                      weight_decay=0.0))
  c.eval.update(dict(every=max(a.steps // 5, 1), batches=4, batch_size=16))
  c.checkpoint.update(dict(every=max(a.steps // 5, 1), keep=2))
  return c
