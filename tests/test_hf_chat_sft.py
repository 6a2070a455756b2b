"""Chat template rendering/masking vs apply_chat_template, and SFT loss vs transformers labels=."""

import numpy as np
import pytest

from ftjax import data
from ftjax.data import testing as dt
from ftjax.data import tokenize as tk

# Templates shaped like the real ones, with {% generation %} so transformers itself reports
# which tokens are the assistant's (return_assistant_tokens_mask) -- the reference mask.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
          "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>\n' }}"
          "{% endgeneration %}{% else %}{{ m['content'] + '<|im_end|>\n' }}{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}"
          "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
          "{% if m['role'] == 'assistant' %}{% generation %}"
          "{{ m['content'] | trim + '<|eot_id|>' }}"
          "{% endgeneration %}{% else %}{{ m['content'] | trim + '<|eot_id|>' }}{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6, of course."}]


def _tokenizer(tmp_path, template, bos=True):
  tok = data.load_tokenizer(dt.make_tokenizer(str(tmp_path / "tok"), template))
  if not bos:  # Qwen-style tokenizers have no bos token
    tok.bos_token = None
  return tok


@pytest.mark.parametrize("template,bos", [(LLAMA3, True), (CHATML, False)],
                         ids=["llama3_bos_in_template", "chatml_no_bos"])
def test_messages_match_apply_chat_template(template, bos, tmp_path):
  tok = _tokenizer(tmp_path, template, bos)
  ref = tok.apply_chat_template(MESSAGES, tokenize=True, return_dict=True,
                                return_assistant_tokens_mask=True)
  ids, mask = tk.encode_example(tok, {"messages": MESSAGES}, "example")
  assert list(ids) == list(ref["input_ids"])
  assert list(mask) == list(ref["assistant_masks"])
  assert 0 < mask.sum() < len(mask)


def test_chatml_with_tokenizer_bos(tmp_path):
  tok = _tokenizer(tmp_path, CHATML, bos=True)
  ref = tok.apply_chat_template(MESSAGES, tokenize=True)
  ids, _ = tk.encode_example(tok, {"messages": MESSAGES}, "example")
  assert list(ids) == list(ref if isinstance(ref, list) else ref["input_ids"])


def test_sft_loss_matches_transformers_labels(tmp_path):
  """ftjax SFT loss on a pipeline batch == transformers loss with -100 on non-assistant tokens."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from ftjax import objectives  # pylint: disable=g-import-not-at-top
  from ftjax.models import Decoder, hf  # pylint: disable=g-import-not-at-top
  from ftjax.models import hf_testing as ht  # pylint: disable=g-import-not-at-top

  tok = _tokenizer(tmp_path, LLAMA3)
  rows = [{"messages": MESSAGES},
          {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello there"}]}]
  dcfg = data.default_config()
  dcfg.train = ({"path": dt.write_jsonl(str(tmp_path / "d.jsonl"), rows), "weight": 1.0},)
  dcfg.packing, dcfg.shuffle = False, False
  batch = next(iter(data.build_iterator(dcfg, tok, split="train", global_batch_size=2,
                                        seq_len=320, seed=0)))
  path = ht.save_tiny("llama", tmp_path / "m", vocab_size=len(tok), max_position_embeddings=512)
  cfg, params = hf.load_hf(path)
  ctx = objectives.ObjectiveContext(model=Decoder(cfg), config=ml_collections.ConfigDict())
  (loss_sum, count), _ = objectives.get("sft")(params, batch, jax.random.key(0), ctx)
  ours = float(loss_sum / count)

  # transformers: labels from apply_chat_template's own assistant mask, -100 elsewhere (prompt,
  # template, padding); the model shifts labels by one internally.
  seg = batch["segment_ids"]
  labels = np.full(batch["tokens"].shape, -100, np.int64)
  for r, row in enumerate(rows):
    ref = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    n = len(ref["input_ids"])
    assert list(batch["tokens"][r, :n]) == list(ref["input_ids"]) and seg[r, n:].sum() == 0
    labels[r, :n] = np.where(np.asarray(ref["assistant_masks"]) > 0, ref["input_ids"], -100)
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(batch["tokens"].astype(np.int64)),
                attention_mask=torch.as_tensor((seg > 0).astype(np.int64)),
                labels=torch.as_tensor(labels.astype(np.int64)))
  assert count == (labels != -100).sum() > 10
  np.testing.assert_allclose(ours, out.loss.item(), rtol=1e-5)
