"""The shipped task: deterministic generation, exact verification, held-out split disjoint."""

import json
import os

from ftjax.tasks import arithmetic as task

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "ftjax", "assets", "data",
                      "arithmetic")


def _rows(name):
  with open(os.path.join(ASSETS, name)) as f:
    return [json.loads(l) for l in f]


def test_generate_is_deterministic_and_correct():
  a = task.generate(50, seed=3)
  assert a == task.generate(50, seed=3) and a != task.generate(50, seed=4)
  assert all(task.verify(ex["prompt"], ex["completion"]) for ex in a)
  assert not task.verify("12+30=", "41") and task.verify("12+30=", " 42 ")
  assert not task.verify("garbage", "1")


def test_preferences_reject_wrong_answers():
  for ex in task.generate_preferences(200, seed=0):
    assert task.verify(ex["prompt"], ex["chosen"])
    assert not task.verify(ex["prompt"], ex["rejected"])
  kto = task.generate_unpaired(100, seed=0)
  assert all(task.verify(e["prompt"], e["completion"]) == e["label"] for e in kto)


def test_shipped_splits_do_not_overlap():
  test_prompts = {r["prompt"] for r in _rows("test.jsonl")}
  assert len(test_prompts) == 500
  for name in ("train.jsonl", "preference_train.jsonl", "kto_train.jsonl"):
    assert not test_prompts & {r["prompt"] for r in _rows(name)}, name
  assert {r["prompt"] for r in _rows("preference_test.jsonl")} == test_prompts


def test_self_play_pairs_reject_the_models_own_wrong_answers():
  rows = [{"prompt": "12+30=", "chosen": "42", "rejected": "52"},
          {"prompt": "9+9=", "chosen": "18", "rejected": "81"},
          {"prompt": "5+5=", "chosen": "10", "rejected": "0"},
          {"prompt": "7+0=", "chosen": "7", "rejected": "8"}]
  got = task.self_play_preferences(rows, ["43", " 18 ", "", "6\n"])
  # right answers and empty completions give no pair; wrong ones are rejected verbatim (stripped)
  assert got == [{"prompt": "12+30=", "chosen": "42", "rejected": "43"},
                 {"prompt": "7+0=", "chosen": "7", "rejected": "6"}]
  for ex in got:
    assert task.verify(ex["prompt"], ex["chosen"]) and not task.verify(ex["prompt"],
                                                                       ex["rejected"])


def test_dpo_config_mixes_in_self_play_pairs_from_the_sft_run():
  from ftjax.config import load_config
  c = load_config("dpo_tiny:sft=runs/x,self_play=0.25")
  static, own = c.data.train
  assert static["path"].endswith("preference_train.jsonl") and static["weight"] == 0.75
  assert own == {"path": os.path.join("runs/x", "self_play_train.jsonl"), "weight": 0.25}
  assert len(load_config("dpo_tiny:sft=runs/x,self_play=0").data.train) == 1
