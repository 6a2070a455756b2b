"""Data pipeline: encoding masks, packing, truncation, errors, mixtures, sharding, resume."""

import json

import numpy as np
import pytest

from ftjax import data
from ftjax.data import testing

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"}, {"role": "user", "content": "2+2"},
        {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return data.load_tokenizer(testing.make_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def _cfg(*paths, **kw):
  c = data.default_config()
  c.train = tuple({"path": str(p)} for p in paths)
  c.eval = c.train
  for k, v in kw.items():
    c[k] = v
  return c


def _sft_rows(n, start=0):
  return [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(start, start + n)]


def _iter(c, tok, **kw):
  args = dict(split="train", global_batch_size=4, seq_len=32, seed=0)
  args.update(kw)
  return data.build_iterator(c, tok, **args)


def _segments(batch):
  """(tokens, targets, loss_mask, positions) per packed segment of every row."""
  out = []
  for r in range(batch["tokens"].shape[0]):
    seg = batch["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      idx = np.nonzero(seg == s)[0]
      assert (np.diff(idx) == 1).all()
      out.append(tuple(batch[k][r, idx] for k in ("tokens", "targets", "loss_mask", "positions")))
  return out


def test_load_tokenizer_pad_fallback_and_missing_dir(tmp_path):
  t = data.load_tokenizer(testing.make_tokenizer(str(tmp_path / "nopad"), pad=False))
  assert t.pad_token_id == t.eos_token_id == 2
  with pytest.raises(FileNotFoundError, match="config.data.tokenizer: .*missing"):
    data.load_tokenizer(str(tmp_path / "missing"))


def test_sft_text_masks(tok):
  ids, mask = data.encode_example(tok, {"prompt": "1+1=", "completion": "2"}, "x")
  assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
  assert tok.decode(ids[mask == 1]) == "2<eos>"
  assert tok.decode(ids[mask == 0]) == "<bos>1+1="
  ids, mask = data.encode_example(tok, {"text": "abc"}, "x")
  assert tok.decode(ids) == "<bos>abc<eos>" and mask.tolist() == [0, 1, 1, 1, 1]


def test_messages_mask_is_exactly_assistant_spans(tok):
  ids, mask, _ = data.tokenize.encode_messages(tok, MSGS, "x")
  ref = tok.apply_chat_template(MSGS, tokenize=True, return_dict=False)
  assert ids.tolist() == list(ref)  # template renders bos itself: no second bos
  spans, cur = [], []
  for i, m in zip(ids, mask):
    if m:
      cur.append(i)
    elif cur:
      spans.append(tok.decode(cur))
      cur = []
  spans.append(tok.decode(cur)) if cur else None
  assert spans == ["yo<eos>", "4<eos>"]
  prompt = data.encode_prompt(tok, {"messages": MSGS})
  assert tok.decode(prompt).endswith("u:2+2<eos>a:")
  assert prompt == ids[:len(prompt)].tolist() and mask[len(prompt)] == 1
  no_answer = data.encode_prompt(tok, {"messages": MSGS[:4]})
  assert no_answer == prompt


def test_messages_without_offsets_same_mask(tok):
  class NoOffsets:  # e.g. a slow (python) tokenizer
    def __init__(self, t):
      self._t = t

    def __getattr__(self, name):
      return getattr(self._t, name)

    def __call__(self, text, **kw):
      if kw.get("return_offsets_mapping"):
        raise NotImplementedError
      return self._t(text, **kw)

  want = data.tokenize.encode_messages(tok, MSGS, "x")
  got = data.tokenize.encode_messages(NoOffsets(tok), MSGS, "x")
  assert [np.asarray(g).tolist() for g in got] == [np.asarray(w).tolist() for w in want]


def test_encode_prompt_matches_training_prefix(tok):
  ex = {"prompt": "12+30=", "completion": "42"}
  ids, mask = data.encode_example(tok, ex, "x")
  p = data.encode_prompt(tok, ex)
  assert p == ids[:len(p)].tolist() and mask[:len(p)].sum() == 0 and mask[len(p)] == 1
  conv = {"prompt": MSGS[:2], "completion": MSGS[2:3]}
  ids, mask = data.encode_example(tok, conv, "x")
  p = data.encode_prompt(tok, conv)
  assert p == ids[:len(p)].tolist() and tok.decode(ids[mask == 1]) == "yo<eos>"


def test_packing_segments_targets_mask(tok, tmp_path):
  rows = _sft_rows(30)
  path = testing.write_jsonl(tmp_path / "a.jsonl", rows)
  it = _iter(_cfg(path, shuffle=False), tok, num_epochs=1, seq_len=24)
  enc = {tuple(i.tolist()): m for i, m in (data.encode_example(tok, r, "x") for r in rows)}
  got, nrows = [], 0
  for b in it:
    assert {k: v.dtype.name for k, v in b.items()} == {
        "tokens": "int32", "targets": "int32", "loss_mask": "float32",
        "segment_ids": "int32", "positions": "int32"}
    assert b["loss_mask"][b["segment_ids"] == 0].sum() == 0
    nrows += (b["segment_ids"].max(1) > 0).sum()
    for toks, tgts, lm, pos in _segments(b):
      mask = enc[tuple(toks.tolist())]
      assert pos.tolist() == list(range(len(toks)))
      assert tgts[:-1].tolist() == toks[1:].tolist() and tgts[-1] == tok.pad_token_id
      assert lm.tolist() == mask[1:].tolist() + [0]  # no target across a segment end
      got.append(tuple(toks.tolist()))
  assert sorted(got) == sorted(enc)  # every example exactly once in one epoch
  assert nrows < len(rows)  # packing put several examples in a row
  assert it.stats["examples"] == 30


def test_first_fit_rows():
  exs = [{"tokens": np.full(n, n, np.int32), "mask": np.ones(n, np.int32)} for n in (5, 3, 4, 2)]
  rows = data.pipeline.pack_examples(exs, 8, pad_id=0)
  assert rows["tokens"].tolist() == [[5] * 5 + [3] * 3, [4] * 4 + [2] * 2 + [0] * 2]
  assert rows["segment_ids"].tolist() == [[1] * 5 + [2] * 3, [1] * 4 + [2] * 2 + [0] * 2]
  assert rows["positions"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0, 0]]


def test_no_packing_one_example_per_row(tok, tmp_path):
  path = testing.write_jsonl(tmp_path / "a.jsonl", _sft_rows(6))
  b = next(_iter(_cfg(path, packing=False, shuffle=False), tok, global_batch_size=6))
  assert (b["segment_ids"].max(1) == 1).all()
  assert b["tokens"][:, 0].tolist() == [tok.bos_token_id] * 6


def test_truncation_policies_and_counts(tok, tmp_path):
  rows = _sft_rows(4) + [{"prompt": "1+1=", "completion": "9" * 40},
                         {"prompt": "7" * 40, "completion": "1"}]
  path = testing.write_jsonl(tmp_path / "t.jsonl", rows)
  it = _iter(_cfg(path, truncation="truncate"), tok, seq_len=16)
  b = next(it)
  # the over-long prompt leaves no target when cut: dropped, not truncated
  assert it.stats["truncated"] == 1 and it.stats["dropped"] == 1
  assert it.stats["examples"] == 5 and (b["segment_ids"] >= 0).all()
  it = _iter(_cfg(path, truncation="drop"), tok, seq_len=16)
  assert (it.stats["truncated"], it.stats["dropped"], it.stats["examples"]) == (0, 2, 4)
  with pytest.raises(data.DataError, match=r"t\.jsonl:5: example is 46 tokens.*max_length=16"):
    _iter(_cfg(path, truncation="error"), tok, seq_len=16)
  with pytest.raises(ValueError, match="config.data.max_length=64 exceeds"):
    _iter(_cfg(path, max_length=64), tok, seq_len=16)


@pytest.mark.parametrize("content,match", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n', r"bad\.jsonl:2: malformed JSON"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n',
     r"bad\.jsonl:2: cannot detect the format from fields \['prompt'\]"),
    ('{"prompt": "a", "completion": 3}\n', r"bad\.jsonl:1: field 'completion' must be a string"),
    ('[1, 2]\n', r"bad\.jsonl:1: expected a JSON object"),
    ('\n\n', r"bad\.jsonl: dataset is empty"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n',
     r"bad\.jsonl:1: no assistant turn"),
    ('{"messages": [{"role": "user"}]}\n', r"bad\.jsonl:1: messages\[0\] must be an object"),
])
def test_bad_input_errors(tok, tmp_path, content, match):
  path = tmp_path / "bad.jsonl"
  path.write_text(content)
  with pytest.raises(data.DataError, match=match):
    _iter(_cfg(path), tok)


def test_config_errors(tok, tmp_path):
  path = testing.write_jsonl(tmp_path / "a.jsonl", [{"text": "abc"}])
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    _iter(_cfg(tmp_path / "nope.jsonl"), tok)
  with pytest.raises(data.DataError, match=r"a\.jsonl:1: missing field 'prompt'"):
    _iter(_cfg(path, format="sft"), tok)
  c = _cfg(path)
  c.train = ({"path": str(path), "weight": 0.0},)
  with pytest.raises(ValueError, match=r"config.data.train\[0\].weight must be > 0"):
    _iter(c, tok)
  with pytest.raises(ValueError, match="not divisible by process_count=3"):
    _iter(_cfg(path), tok, process_count=3)


def test_mixture_follows_weights(tok, tmp_path):
  a = testing.write_jsonl(tmp_path / "a.jsonl", [{"text": "a" * 5}] * 10)
  b = testing.write_jsonl(tmp_path / "b.jsonl", [{"text": "b" * 5}] * 7)
  c = _cfg(a, b, packing=False)
  c.train = ({"path": str(a), "weight": 3.0}, {"path": str(b), "weight": 1.0})
  it = _iter(c, tok, global_batch_size=8, seq_len=8)
  first = np.concatenate([next(it)["tokens"][:, 1] for _ in range(25)])
  share_a = (first == tok.convert_tokens_to_ids("a")).mean()
  assert abs(share_a - 0.75) < 0.02


def test_process_shards_concatenate_to_global_batch(tok, tmp_path):
  path = testing.write_jsonl(tmp_path / "a.jsonl", _sft_rows(40))
  c = _cfg(path)
  full = _iter(c, tok, global_batch_size=4, seed=3)
  shards = [_iter(c, tok, global_batch_size=4, seed=3, process_index=p, process_count=2)
            for p in range(2)]
  for _ in range(5):
    g = next(full)
    parts = [next(s) for s in shards]
    for k in g:
      assert parts[0][k].shape[0] == 2
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), g[k])


@pytest.mark.parametrize("packing,window", [(True, 1024), (True, 5), (False, 1)])
def test_state_resumes_exactly(tok, tmp_path, packing, window):
  path = testing.write_jsonl(tmp_path / "a.jsonl", _sft_rows(37))
  c = _cfg(path, packing=packing, packing_window=window)
  it = _iter(c, tok, global_batch_size=4, seed=1)
  for _ in range(7):  # crosses an epoch boundary
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(5)]
  it2 = _iter(c, tok, global_batch_size=4, seed=1, process_index=1, process_count=2)
  it2.set_state(state)
  for w in want:
    got = next(it2)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k][2:])


def test_eval_one_epoch_pads_last_batch(tok, tmp_path):
  path = testing.write_jsonl(tmp_path / "e.jsonl", _sft_rows(5))
  it = _iter(_cfg(path, packing=False), tok, split="eval", num_epochs=1, global_batch_size=4)
  batches = list(it)
  assert len(batches) == 2 and batches[1]["segment_ids"][1:].max() == 0
  assert batches[1]["loss_mask"][1:].sum() == 0
  assert [r["prompt"] for r in data.load_examples(_cfg(path), "eval")][:2] == ["0+0=", "1+1="]
  chat = testing.write_jsonl(tmp_path / "c.jsonl", [{"messages": MSGS}])
  assert data.load_examples(_cfg(chat), "eval")[0]["completion"] == "4"


def test_csv_and_json_sources(tok, tmp_path):
  (tmp_path / "d.csv").write_text("prompt,completion\n1+1=,2\n2+2=,4\n")
  (tmp_path / "d.json").write_text(json.dumps(_sft_rows(2)))
  for name, want in (("d.csv", ["2", "4"]), ("d.json", ["0", "2"])):
    rows = data.load_examples(_cfg(tmp_path / name), "train")
    assert [r["completion"] for r in rows] == want


def test_parquet_source(tok, tmp_path):
  pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
  pq.write_table(pa.table({"prompt": ["1+1="], "completion": ["2"]}),
                 str(tmp_path / "d.parquet"))
  b = next(_iter(_cfg(tmp_path / "d.parquet", packing=False), tok, global_batch_size=2))
  assert tok.decode(b["tokens"][0][b["segment_ids"][0] > 0]) == "<bos>1+1=2<eos>"


def test_shipped_tokenizer_and_task():
  c = data.default_config()
  tok = data.load_tokenizer(c.tokenizer)
  ex = data.load_examples(c, "eval")[0]
  ids, mask = data.encode_example(tok, ex, "x")
  prompt = data.encode_prompt(tok, ex)
  assert prompt == ids[:len(prompt)].tolist()
  assert tok.decode(ids[mask == 1], skip_special_tokens=True) == ex["completion"]
  msgs = [{"role": "user", "content": ex["prompt"]},
          {"role": "assistant", "content": ex["completion"]}]
  ids, mask = data.encode_example(tok, {"messages": msgs}, "x")
  assert tok.decode(ids[mask == 1]) == ex["completion"] + tok.eos_token
  b = next(data.build_iterator(c, tok, split="eval", global_batch_size=2, seq_len=32, seed=0))
  assert b["loss_mask"].sum() > 0 and b["segment_ids"].max() > 1
