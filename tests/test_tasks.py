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
