"""DPO of the shipped SFT model on the arithmetic preference split (correct vs wrong answer).

  ftjax train --config configs/sft_tiny.py --workdir runs/sft_tiny
  ftjax train --config configs/dpo_tiny.py:sft=runs/sft_tiny --workdir runs/dpo_tiny

Starts from the SFT run's latest checkpoint (config.init_from) with the same model; the
reference is a frozen copy of those weights (objective.reference='copy'; 'precomputed' caches
reference log-probs, 'none' is reference-free). 150 steps x 16 pairs x 32 tokens ~ 2,400 pairs
(half an epoch of the 5k-pair split). Eval reports held-out rewards/accuracies on 128 unseen
pairs and greedy exact match (answer = the chosen completion) on 200 held-out prompts.
Measured (2 shared CPU cores, SFT run at exact match 0.63): rewards/accuracies 0 -> 0.81, exact
match 0.63 -> 0.645 with these defaults (RPO: rpo_alpha=1 adds the chosen NLL, lr 5e-5). Plain
DPO (rpo_alpha=0, lr 2e-4) reached 0.84 accuracy but exact match fell to 0.445: the chosen
log-probs drop too (-0.82 -> -1.62), the known DPO failure RPO's NLL term prevents. Variants: --config.objective.loss_type=ipo (any TRL DPO loss type), ...beta=0.3,
...rpo_alpha=1.0, or --config configs/simpo_tiny.py / orpo_tiny.py / kto_tiny.py. TRL's multi-loss
combinations: "--config.objective.loss_type=('sigmoid','bco_pair','sft')"
"--config.objective.loss_weights=(0.8,0.2,1.0)" (MPO; no weights = all 1); f-DPO:
--config.objective.f_divergence_type=js_divergence (or forward_kl, alpha_divergence with
...f_alpha_divergence_coef); LD-DPO --config.objective.ld_alpha=0.5; WPO
--config.objective.use_weighting=True.
"""

import ml_collections
from ml_collections import config_dict

from ftjax.config import load_config, parse_arg
from ftjax.data import asset_path


def preference_config(a, objective: dict, kind: str = "preference"):
  """The SFT config turned into a preference run: data, objective, shorter schedule, eval."""
  c = load_config("sft_tiny")
  c.init_from = a.sft
  c.data.kind = kind
  name = "kto_train.jsonl" if kind == "kto" else "preference_train.jsonl"
  c.data.train = ({"path": asset_path(f"data/arithmetic/{name}"), "weight": 1.0},)
  c.data.eval = ({"path": asset_path("data/arithmetic/preference_test.jsonl"), "weight": 1.0},)
  c.data.packing = False  # preference rows hold one sequence each
  c.data.identical_pairs = "warn"  # or 'drop'
  c.objective = ml_collections.ConfigDict(objective)
  c.train.update(dict(steps=a.steps, batch_size=16, seq_len=32, log_every=10))
  c.optim.update(dict(lr=a.lr, warmup_steps=10, schedule="cosine", weight_decay=0.0))
  c.eval.update(dict(every=max(a.steps // 3, 1), batches=8, batch_size=16,
                     exact_match_examples=200, max_new_tokens=5))
  if kind == "kto":
    c.eval.update(dict(every=0, exact_match_examples=0))  # no unpaired held-out split
  c.checkpoint.update(dict(every=0, keep=1))
  return c


def get_config(arg=None):
  a = parse_arg(arg, steps=150, sft="runs/sft_tiny", lr=5e-5, beta=0.1, rpo_alpha=1.0)
  return preference_config(a, dict(
      name="dpo", loss_type=("sigmoid",), loss_weights=(), beta=a.beta, label_smoothing=0.0,
      rpo_alpha=a.rpo_alpha, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
      discopop_tau=0.05, ld_alpha=config_dict.placeholder(float), use_weighting=False,
      reference="copy"))
