"""HF tensor name <-> ftjax param path tables, one function per family.

A `Rule` maps one HF tensor name template to one or more ftjax param paths:

- `{i}` in the name is the layer index, `{e}` the expert index; each placeholder consumes one
  leading stacked axis of the ftjax param (scanned layers: [L, ...]; experts: [L, E, ...]).
- kind 'linear': HF nn.Linear stores [out, in]; ftjax stores [in, out] (transposed both ways).
  kind 'copy': same layout (norms, biases, embeddings, GPT-2 Conv1D which is already [in, out]).
- several `paths`: the HF tensor is the concatenation of the ftjax params along their last axis
  (GPT-2's fused c_attn = [q | k | v]).

Adding a family (the MoE engineer: Mixtral / Qwen2-MoE / Qwen3-MoE):
  1. `hf_config.register_family(Family(model_type, arch, to_cfg, to_hf))`;
  2. `register_table(model_type, fn)` where `fn(cfg) -> (rules, ignore_patterns)`; reuse
     `llama_table(cfg)` for attention/norms/embeddings and add expert rules, e.g.
     `Rule("model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
           (("layers", "mlp", "experts", "gate_proj", "kernel"),), "linear")`.
  Loading checks every ftjax param is covered and every HF tensor consumed, so a wrong table is
  an error naming the tensor, never a silently random weight.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, List, Sequence, Tuple

from ftjax.models.config import ModelConfig

Path = Tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str
  paths: Tuple[Path, ...]
  kind: str = "copy"  # copy | linear | expert_linear (stacked [E, out, in] <-> [E, in, out])

  @property
  def placeholders(self) -> Tuple[str, ...]:
    return tuple(p for p in ("i", "e") if "{" + p + "}" in self.hf)


TableFn = Callable[[ModelConfig], Tuple[List[Rule], Sequence[str]]]
TABLES: Dict[str, TableFn] = {}


def register_table(model_type: str, fn: TableFn) -> TableFn:
  TABLES[model_type] = fn
  return fn


def table_for(cfg: ModelConfig, names=None) -> Tuple[List[Rule], List[re.Pattern]]:
  """names: the checkpoint's tensor names when loading (None on export); tables marked
  `reads_names` (MoE: v4 per-expert vs v5 fused experts) pick their layout from them."""
  if cfg.family not in TABLES:
    raise ValueError(f"model.family={cfg.family!r}: no HF weight table (supported: "
                     f"{', '.join(sorted(TABLES))})")
  fn = TABLES[cfg.family]
  rules, ignore = fn(cfg, names) if getattr(fn, "reads_names", False) else fn(cfg)
  return rules, [re.compile(p) for p in ignore]


def _lin(hf: str, path: Path, bias: bool) -> List[Rule]:
  """nn.Linear weight (+ bias) -> Linear kernel (+ bias)."""
  rules = [Rule(hf + ".weight", (path + ("kernel",),), "linear")]
  if bias:
    rules.append(Rule(hf + ".bias", (path + ("bias",),)))
  return rules


def llama_table(cfg: ModelConfig, prefix: str = "model.") -> Tuple[List[Rule], List[str]]:
  """Llama, Mistral, Qwen2/3, Gemma/Gemma 2 (names are shared; switches add or drop rows)."""
  lay = prefix + "layers.{i}."
  att, mlp = ("layers", "self_attn"), ("layers", "mlp")
  r = [Rule(prefix + "embed_tokens.weight", (("embed_tokens", "embedding"),)),
       Rule(prefix + "norm.weight", (("norm", "scale"),))]
  for p in ("q", "k", "v"):
    r += _lin(lay + f"self_attn.{p}_proj", att + (f"{p}_proj",), cfg.qkv_bias)
  r += _lin(lay + "self_attn.o_proj", att + ("o_proj",), cfg.o_bias)
  if cfg.qk_norm:
    r += [Rule(lay + f"self_attn.{p}_norm.weight", (att + (f"{p}_norm", "scale"),))
          for p in ("q", "k")]
  norms = ["input_layernorm", "post_attention_layernorm"]
  if cfg.post_norms:
    norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
  r += [Rule(lay + n + ".weight", (("layers", n, "scale"),)) for n in norms]
  if not cfg.num_experts:
    for p in ("gate_proj", "up_proj", "down_proj") if cfg.mlp_gated else ("up_proj", "down_proj"):
      r += _lin(lay + "mlp." + p, mlp + (p,), cfg.mlp_bias)
  if not cfg.tie_embeddings:
    r.append(Rule("lm_head.weight", (("lm_head", "kernel"),), "linear"))
  ignore = [r".*rotary_emb\.inv_freq$"]
  if cfg.tie_embeddings:
    ignore.append(r"^lm_head\.weight$")  # some tied checkpoints store the copy anyway
  return r, ignore


def gpt2_table(cfg: ModelConfig) -> Tuple[List[Rule], List[str]]:
  """GPT-2: Conv1D weights are already [in, out]; c_attn is [q | k | v] fused."""
  lay, att = "transformer.h.{i}.", ("layers", "self_attn")
  r = [Rule("transformer.wte.weight", (("embed_tokens", "embedding"),)),
       Rule("transformer.wpe.weight", (("embed_positions", "embedding"),)),
       Rule("transformer.ln_f.weight", (("norm", "scale"),)),
       Rule("transformer.ln_f.bias", (("norm", "bias"),))]
  for hf, ours in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
    r += [Rule(lay + f"{hf}.weight", (("layers", ours, "scale"),)),
          Rule(lay + f"{hf}.bias", (("layers", ours, "bias"),))]
  for suffix in ("weight", "bias"):
    leaf = "kernel" if suffix == "weight" else "bias"
    r.append(Rule(lay + f"attn.c_attn.{suffix}",
                  tuple(att + (f"{p}_proj", leaf) for p in ("q", "k", "v"))))
    r.append(Rule(lay + f"attn.c_proj.{suffix}", (att + ("o_proj", leaf),)))
    r.append(Rule(lay + f"mlp.c_fc.{suffix}", (("layers", "mlp", "up_proj", leaf),)))
    r.append(Rule(lay + f"mlp.c_proj.{suffix}", (("layers", "mlp", "down_proj", leaf),)))
  if not cfg.tie_embeddings:
    r.append(Rule("lm_head.weight", (("lm_head", "kernel"),), "linear"))
  # Causal-mask buffers of old checkpoints; a tied head stored anyway.
  ignore = [r".*\.attn\.(masked_)?bias$"]
  if cfg.tie_embeddings:
    ignore.append(r"^lm_head\.weight$")
  return r, ignore


for _mt in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"):
  register_table(_mt, llama_table)
register_table("gpt2", gpt2_table)

# Old GPT-2 checkpoints name tensors without the "transformer." prefix.
ALIASES = {"gpt2": ("transformer.", "")}
