"""Evaluation: held-out objective loss and (for prompt/completion data) greedy exact match."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.train.step import finalize_metrics, merge_params


def eval_loss(eval_step, params, frozen, make_iter, put_batch, num_batches: int, ref=None):
  """Objective metrics summed over `num_batches` held-out batches (exact pair reduction)."""
  it = make_iter()
  total = None
  for _ in range(num_batches):
    try:
      batch = next(it)
    except StopIteration:
      break
    m = eval_step(params, frozen, put_batch(batch), ref)
    total = m if total is None else jax.tree_util.tree_map(jnp.add, total, m)
  if total is None:
    return {}
  out = finalize_metrics(total)
  return {("eval_" + k if not k.startswith("eval_") else k): v for k, v in out.items()}


def greedy_completions(model, params, frozen, tokenizer, examples, *, max_new_tokens: int,
                       batch_size: int = 64):
  """Decoded greedy completion (special tokens dropped) of each example's prompt, in order."""
  from ftjax import data  # pylint: disable=g-import-not-at-top
  from ftjax.generate import greedy_generate  # pylint: disable=g-import-not-at-top
  prompts = [data.encode_prompt(tokenizer, ex) for ex in examples]
  gen = greedy_generate(model, merge_params(params, frozen), prompts,
                        max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id,
                        pad_id=tokenizer.pad_token_id or 0, batch_size=batch_size)
  return [tokenizer.decode(ids, skip_special_tokens=True) for ids in gen]


def exact_match(model, params, frozen, tokenizer, examples, *, max_new_tokens: int,
                batch_size: int = 64, verify=None):
  """Fraction of held-out prompts whose greedy completion equals the reference (or `verify`)."""
  if not examples:
    return {}
  texts = greedy_completions(model, params, frozen, tokenizer, examples,
                             max_new_tokens=max_new_tokens, batch_size=batch_size)
  hits = 0
  for ex, text in zip(examples, texts):
    if verify is not None:
      hits += bool(verify(ex["prompt"], text))
    else:
      hits += text.strip() == str(ex.get("completion", "")).strip()
  return {"eval_exact_match": hits / len(examples)}


def sample_examples(examples, n: int, seed: int = 0):
  if len(examples) <= n:
    return list(examples)
  idx = np.random.default_rng(seed).choice(len(examples), n, replace=False)
  return [examples[i] for i in sorted(idx)]
