"""KTO on the arithmetic task's unpaired split (prompt, completion, label: answer correct?).

  ftjax train --config configs/kto_tiny.py:sft=runs/sft_tiny --workdir runs/kto_tiny

KL term from mismatched (prompt i, completion i-1) rows of each batch, as TRL; batch > 1 required.
"""

from ftjax.config import config_module, parse_arg


def get_config(arg=None):
  dpo = config_module("dpo_tiny")
  a = parse_arg(arg, steps=150, sft="runs/sft_tiny", lr=2e-4, beta=0.1)
  return dpo.preference_config(a, dict(name="kto", loss_type="kto", beta=a.beta,
                                       desirable_weight=1.0, undesirable_weight=1.0,
                                       reference="copy"), kind="kto")
