"""The shipped default task: multi-digit addition, generated and verified by the project.

"37+58=" -> "95". Small enough that a ~1M-parameter decoder learns it on 2 CPU cores in minutes,
exactly verifiable (exact match now, a programmatic reward for RL later), and it yields
preference pairs for free: the correct sum vs a plausible wrong one (generate_preferences), or
vs the model's own wrong greedy answer (self_play_preferences, SPIN-like on-policy negatives).
"""

from __future__ import annotations

import random
from typing import Dict, Iterable, List, Optional, Set, Tuple

Pair = Tuple[int, int]


def prompt_of(a: int, b: int) -> str:
  return f"{a}+{b}="


def parse_prompt(prompt: str) -> Pair:
  lhs = prompt.strip().rstrip("=")
  a, _, b = lhs.partition("+")
  return int(a), int(b)


def verify(prompt: str, completion: str) -> bool:
  """Exact match of the completion with the true sum (surrounding whitespace ignored)."""
  try:
    a, b = parse_prompt(prompt)
  except ValueError:
    return False
  return completion.strip() == str(a + b)


def reward(prompt: str, completion: str) -> float:
  return 1.0 if verify(prompt, completion) else 0.0


def _pairs(n: int, rng: random.Random, digits: int, exclude: Set[Pair]) -> List[Pair]:
  hi = 10 ** digits - 1
  out = []
  while len(out) < n:
    p = (rng.randint(0, hi), rng.randint(0, hi))
    if p not in exclude:
      out.append(p)
  return out


def held_out_pairs(n: int, seed: int = 1234, digits: int = 2) -> List[Pair]:
  """A fixed set of distinct pairs reserved for evaluation (never generated for training)."""
  rng = random.Random(seed)
  seen: Set[Pair] = set()
  out = []
  for p in _pairs(10 * n, rng, digits, set()):
    if p not in seen:
      seen.add(p)
      out.append(p)
    if len(out) == n:
      break
  return out


def generate(n: int, seed: int = 0, digits: int = 2,
             exclude: Iterable[Pair] = ()) -> List[Dict[str, str]]:
  """n {"prompt","completion"} examples; pairs in `exclude` (the held-out set) never appear."""
  rng = random.Random(seed)
  return [{"prompt": prompt_of(a, b), "completion": str(a + b)}
          for a, b in _pairs(n, rng, digits, set(exclude))]


def wrong_answer(a: int, b: int, rng: random.Random) -> str:
  """A plausible mistake: off by one or ten, a dropped carry, or swapped digits."""
  s = a + b
  cands = {s + 1, s - 1, s + 10, s - 10, int(str(s)[::-1]), (a % 10 + b % 10) % 10 + 10 * (
      (a // 10 + b // 10) % 10) + 100 * ((a // 100 + b // 100))}
  cands = sorted(c for c in cands if c >= 0 and c != s)
  return str(rng.choice(cands))


def generate_preferences(n: int, seed: int = 0, digits: int = 2,
                         exclude: Iterable[Pair] = (),
                         pairs: Optional[List[Pair]] = None) -> List[Dict[str, str]]:
  """{"prompt","chosen","rejected"}: the true sum is chosen, a plausible wrong one rejected."""
  rng = random.Random(seed)
  pairs = pairs if pairs is not None else _pairs(n, rng, digits, set(exclude))
  return [{"prompt": prompt_of(a, b), "chosen": str(a + b), "rejected": wrong_answer(a, b, rng)}
          for a, b in pairs]


def self_play_preferences(rows: Iterable[Dict[str, str]],
                          completions: Iterable[str]) -> List[Dict[str, str]]:
  """On-policy pairs: the true sum chosen, the model's own wrong answer rejected.

  rows: {"prompt", ...} examples; completions: the model's (greedy) answer to each, in order.
  Only prompts the model gets wrong give a pair, so every rejected answer is a mistake the model
  actually makes (mostly off-by-one sums, see tools/make_self_play_data.py), not a random one.
  """
  out = []
  for row, text in zip(rows, completions, strict=True):
    a, b = parse_prompt(row["prompt"])
    text = text.strip()
    if text and not verify(row["prompt"], text):
      out.append({"prompt": row["prompt"], "chosen": str(a + b), "rejected": text})
  return out


def generate_unpaired(n: int, seed: int = 0, digits: int = 2,
                      exclude: Iterable[Pair] = ()) -> List[Dict[str, object]]:
  """KTO-style {"prompt","completion","label"}: half correct (True), half wrong (False)."""
  rng = random.Random(seed)
  out = []
  for i, (a, b) in enumerate(_pairs(n, rng, digits, set(exclude))):
    good = i % 2 == 0
    out.append({"prompt": prompt_of(a, b),
                "completion": str(a + b) if good else wrong_answer(a, b, rng), "label": good})
  return out
