"""KTO on the arithmetic task's unpaired split (prompt, completion, label: answer correct?).

  ftjax train --config configs/kto_tiny.py:sft=runs/sft_tiny --workdir runs/kto_tiny

KL term from mismatched (prompt i, completion i-1) rows of each batch, as TRL; batch > 1 required.
"""

import importlib.util
import os

from ftjax.config import parse_arg


def get_config(arg=None):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dpo_tiny.py")
  spec = importlib.util.spec_from_file_location("ftjax_configs_dpo_tiny", path)
  dpo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(dpo)
  a = parse_arg(arg, steps=150, sft="runs/sft_tiny", lr=2e-4, beta=0.1)
  return dpo.preference_config(a, dict(name="kto", loss_type="kto", beta=a.beta,
                                       desirable_weight=1.0, undesirable_weight=1.0,
                                       reference="copy"), kind="kto")
