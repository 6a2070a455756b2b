"""Preference data pipeline: layout, conversational pairs, KTO KL rows, bad input, resume."""

import json

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ftjax import data
from ftjax.data import preference as P
from ftjax.data import testing as dt
from ftjax.data.io import DataError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return data.load_tokenizer(dt.make_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def _cfg(path, kind="preference", **kw):
  c = data.default_config()
  c.kind = kind
  c.train = ({"path": str(path)},)
  c.eval = ({"path": str(path)},)
  c.identical_pairs = "warn"
  c.update(kw)
  return c


def _it(tok, path, kind="preference", bs=2, seq=24, **kw):
  return P.build_preference_iterator(_cfg(path, kind, **kw), tok, split="eval",
                                     global_batch_size=bs, seq_len=seq, seed=0, num_epochs=1)


def _ids(tok, s):
  return tok(s, add_special_tokens=False)["input_ids"]


def test_paired_strings_layout(tok, tmp_path):
  path = dt.write_jsonl(tmp_path / "p.jsonl", [
      {"prompt": "1+2=", "chosen": "3", "rejected": "45"},
      {"prompt": "9+9=", "chosen": "18", "rejected": "19"},
      {"prompt": "0+0=", "chosen": "0", "rejected": "1"}])
  it = _it(tok, path)
  b = next(it)
  bos, eos = tok.bos_token_id, tok.eos_token_id
  want = [bos] + _ids(tok, "1+2=") + _ids(tok, "45") + [eos]
  np.testing.assert_array_equal(b["rejected_tokens"][0, :len(want)], want)
  assert b["rejected_segment_ids"][0].sum() == len(want)
  # loss on the targets that are completion tokens: "45" and eos.
  np.testing.assert_array_equal(np.nonzero(b["rejected_loss_mask"][0])[0], [4, 5, 6])
  np.testing.assert_array_equal(b["chosen_targets"][0, :4], want[1:5])
  np.testing.assert_array_equal(b["example_id"], [0, 1])
  last = next(it)  # final partial batch: one padding row
  np.testing.assert_array_equal(last["example_id"], [2, -1])
  assert last["chosen_loss_mask"][1].sum() == 0
  with pytest.raises(StopIteration):
    next(it)


def test_conversational_and_implicit_prompt_agree(tok, tmp_path):
  u = {"role": "user", "content": "2+2?"}
  good, bad = {"role": "assistant", "content": "4"}, {"role": "assistant", "content": "5"}
  explicit = dt.write_jsonl(tmp_path / "e.jsonl", [{"prompt": [u], "chosen": [good],
                                                     "rejected": [bad]}])
  implicit = dt.write_jsonl(tmp_path / "i.jsonl", [{"chosen": [u, good], "rejected": [u, bad]}])
  a, b = next(_it(tok, explicit, bs=1)), next(_it(tok, implicit, bs=1))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  rendered = tok.apply_chat_template([u, good], tokenize=False)
  n = int(a["chosen_segment_ids"][0].sum())
  assert tok.decode(a["chosen_tokens"][0, :n]) .replace(" ", "") == rendered.replace(" ", "")
  # the loss covers exactly the assistant's content and its end-of-turn token
  tgt = a["chosen_targets"][0][a["chosen_loss_mask"][0] > 0]
  assert tok.decode(tgt[:-1]) == "4" and tgt[-1] == tok.eos_token_id


def test_kto_rows_and_kl_pairs(tok, tmp_path):
  rows = [{"prompt": f"{i}+1=", "completion": str(i + 1), "label": bool(i % 2)} for i in range(4)]
  path = dt.write_jsonl(tmp_path / "k.jsonl", rows)
  b = next(_it(tok, path, kind="kto", bs=4))
  np.testing.assert_array_equal(b["label"], [0, 1, 0, 1])
  for i in range(4):
    prev = rows[(i - 1) % 4]["completion"]
    want = [tok.bos_token_id] + _ids(tok, rows[i]["prompt"]) + _ids(tok, prev) + [tok.eos_token_id]
    np.testing.assert_array_equal(b["kl_tokens"][i, :len(want)], want)
    assert b["kl_loss_mask"][i].sum() == len(_ids(tok, prev)) + 1


@pytest.mark.parametrize("row, kind, match", [
    ({"prompt": "a", "rejected": "b"}, "preference", r"p\.jsonl:2: missing field 'chosen'"),
    ({"prompt": "a", "chosen": "b"}, "preference", "missing field 'rejected'"),
    ({"prompt": "a", "chosen": " ", "rejected": "b"}, "preference", "'chosen' is an empty"),
    ({"chosen": "x", "rejected": "y"}, "preference", "missing field 'prompt'"),
    ({"prompt": "a", "completion": "b"}, "kto", "missing field 'label'"),
    ({"prompt": "a", "completion": "b", "label": "yes"}, "kto", "'label' must be a bool"),
    ({"prompt": "a", "completion": "", "label": True}, "kto", "empty completion"),
])
def test_bad_rows_name_file_line_field(tok, tmp_path, row, kind, match):
  ok = ({"prompt": "a", "chosen": "b", "rejected": "c"} if kind == "preference"
        else {"prompt": "a", "completion": "b", "label": True})
  path = dt.write_jsonl(tmp_path / "p.jsonl", [ok, row])
  with pytest.raises(DataError, match=match):
    _it(tok, path, kind=kind)


def test_identical_pairs_warn_or_drop(tok, tmp_path):
  path = dt.write_jsonl(tmp_path / "same.jsonl", [
      {"prompt": "a", "chosen": "b", "rejected": "b"},
      {"prompt": "a", "chosen": "b", "rejected": "c"}])
  warn = _it(tok, path, identical_pairs="warn")
  assert warn.stats["identical_pairs"] == 1 and warn.stats["examples"] == 2
  drop = _it(tok, path, identical_pairs="drop", bs=1)
  assert drop.stats["dropped"] == 1 and drop.stats["examples"] == 1
  with pytest.raises(ValueError, match="identical_pairs"):
    _it(tok, path, identical_pairs="error")


def test_resume_is_exact(tok):
  c = _cfg(data.asset_path("data/arithmetic/preference_train.jsonl"))
  mk = lambda: P.build_preference_iterator(c, tok, split="train", global_batch_size=4,
                                           seq_len=16, seed=3)
  it = mk()
  next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = next(it)
  it2 = mk()
  it2.set_state(state)
  got = next(it2)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  # two processes: disjoint halves of the same global batch
  halves = [P.build_preference_iterator(c, tok, split="train", global_batch_size=4, seq_len=16,
                                        seed=3, process_index=i, process_count=2)
            for i in range(2)]
  full = next(mk())
  ids = np.concatenate([next(h)["example_id"] for h in halves])
  np.testing.assert_array_equal(ids, full["example_id"])


def test_padding_rows_do_not_change_the_loss(tok, tmp_path):
  """A final partial batch's padding rows (example_id -1) carry no loss or metric weight."""
  import jax
  import test_pref_lib as lib
  from ftjax.objectives import get
  path = dt.write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+2=", "chosen": "3",
                                                 "rejected": "4"}])
  padded = jax.tree_util.tree_map(jnp.asarray, next(_it(tok, path, bs=2, seq=12)))
  single = {k: v[:1] for k, v in padded.items()}
  logits = np.random.RandomState(0).randn(4, 12, 128).astype(np.float32)
  both = {"logits": jnp.asarray(logits)}
  one = {"logits": jnp.asarray(logits[[0, 2]])}  # chosen row 0, rejected row 0
  for name in ("dpo", "simpo", "orpo", "cpo"):
    ctx = lib.ctx(lib.FakeModel(), reference="none", beta=0.5)
    (s1, n1), m1 = get(name)(both, padded, None, ctx)
    (s2, n2), m2 = get(name)(one, single, None, ctx)
    np.testing.assert_allclose(float(s1 / n1), float(s2 / n2), rtol=1e-6, err_msg=name)
    assert float(n1) == 1.0
    for k in m2:
      np.testing.assert_allclose(float(m1[k][0] / m1[k][1]), float(m2[k][0] / m2[k][1]),
                                 rtol=1e-5, err_msg=f"{name} {k}")
