"""The adapter spec (hashable, rides on ModelConfig.peft) and PEFT's module-targeting rules.

Module names are Hugging Face's: the Linear at Flax path ('layers', 'self_attn', 'q_proj') is
`model.layers.{i}.self_attn.q_proj` for layer i, so `target_modules`, `rank_pattern` and
`alpha_pattern` read exactly as in a PEFT `LoraConfig`:
  - a list of names: a module is targeted when its name equals an entry or ends with '.' + entry;
  - a string: a regex that must full-match the module name;
  - 'all-linear': every Linear except the output layer (the LM head, or a reward model's `score`,
    as PEFT for CAUSAL_LM / SEQ_CLS); never the embedding.
A list may also come as a string that reads as a Python list/tuple ('("q_proj","v_proj")'), which is
how a command-line override of a string-typed config field arrives.
`modules_to_save` (PEFT's name) lists modules trained in full next to the adapters (suffix match as
for target_modules): Linears, `lm_head`, `embed_tokens`. A reward model's `score` head is always one
of them, as PEFT's SEQ_CLS task adds 'score' to modules_to_save.
The token embedding (`model.embed_tokens`, PEFT's lora.Embedding) and the LM head (`lm_head`,
also when tied to the embedding) are targeted by name like any other module.
Layers are stacked (nn.scan), so a pattern must select the same modules with the same rank/alpha in
every layer; a pattern that picks some layers only is an error.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import math
import re
from typing import Optional, Tuple, Union

ADAPTER_LEAVES = ("lora_A", "lora_B", "lora_magnitude")
EMBED = ("embed_tokens",)  # Flax paths of the two non-Linear targets
HEAD = ("lm_head",)
SCORE = ("score",)  # reward model head (HF AutoModelForSequenceClassification `score`)
_NOT_ALL_LINEAR = ("model.embed_tokens", "lm_head", "score")
METHODS = ("none", "lora", "dora", "qlora", "hft")


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """LoRA/DoRA/QLoRA hyper-parameters (PEFT LoraConfig names where they exist)."""
  r: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  target_modules: Union[str, Tuple[str, ...]] = "all-linear"
  rank_pattern: Tuple[Tuple[str, int], ...] = ()
  alpha_pattern: Tuple[Tuple[str, float], ...] = ()
  use_rslora: bool = False
  use_dora: bool = False
  quantize: Optional[str] = None  # None | 'nf4' (QLoRA: every Linear's base kernel)
  block_size: int = 64  # NF4 block along the input dim
  double_quant: bool = False  # NF4 absmax stored as int8 + per-row scale + offset
  modules_to_save: Tuple[str, ...] = ()  # trained in full (HF module names / suffixes)

  def __post_init__(self):
    if int(self.r) <= 0:
      raise ValueError(f"config.peft.r={self.r}: LoRA rank must be > 0")
    for pat, rank in self.rank_pattern:
      if int(rank) <= 0:
        raise ValueError(f"config.peft.rank_pattern[{pat!r}]={rank}: rank must be > 0")
    if not 0.0 <= float(self.dropout) < 1.0:
      raise ValueError(f"config.peft.dropout={self.dropout}: must be in [0, 1)")
    if self.quantize not in (None, "nf4"):
      raise ValueError(f"config.peft.quantize={self.quantize!r}: supported: None, 'nf4'")
    if self.block_size <= 0 or self.block_size % 2:
      raise ValueError(f"config.peft.block_size={self.block_size}: must be a positive even int")
    if not self.target_modules:
      raise ValueError("config.peft.target_modules is empty")
    for pat in ([self.target_modules] if isinstance(self.target_modules, str) else []):
      try:
        re.compile(pat)
      except re.error as e:
        raise ValueError(f"config.peft.target_modules={pat!r}: bad regex ({e})") from e


def hf_name(path: Tuple[str, ...], layer: Optional[int]) -> str:
  """Flax module path -> HF module name; `layer` fills the stacked 'layers' axis."""
  if path in (HEAD, SCORE):
    return path[0]
  parts = ["model"]
  for p in path:
    parts.append(p)
    if p == "layers" and layer is not None:
      parts.append(str(layer))
  return ".".join(parts)


def name_list(value, key: str):
  """A str (regex / name) or a tuple of names from a config value; a string that reads as a Python
  list or tuple ('("q_proj","v_proj")', from a command-line override) becomes that tuple."""
  if isinstance(value, str):
    text = value.strip()
    if text[:1] in "([" and text[-1:] in ")]":
      try:
        parsed = ast.literal_eval(text)
      except (SyntaxError, ValueError):
        parsed = None  # a regex such as '(q|v)_proj'
      if isinstance(parsed, (list, tuple)):
        if not all(isinstance(t, str) for t in parsed):
          raise ValueError(f"config.peft.{key}={value!r}: entries must be strings")
        return tuple(parsed)
    return value
  return tuple(str(t) for t in value)


def name_hit(names, name: str) -> bool:
  """PEFT's list rule: `name` equals an entry or ends with '.' + entry."""
  return any(name == t or name.endswith("." + t) for t in names)


def _target_hit(target, name: str) -> bool:
  if target == "all-linear":
    return name not in _NOT_ALL_LINEAR
  if isinstance(target, str):
    return re.fullmatch(target, name) is not None
  return name_hit(target, name)


def _pattern_value(patterns, name, default):
  # PEFT's get_pattern_key: the first key k with re.match(rf"(.*\.)?({k})$", name).
  for key, value in patterns:
    if re.match(rf"(.*\.)?({key})$", name):
      return value
  return default


@functools.lru_cache(maxsize=None)
def resolve(spec: AdapterSpec, path: Tuple[str, ...], num_layers: int
            ) -> Optional[Tuple[int, float]]:
  """(rank, alpha) of the adapter on the Linear at `path`, or None if it is not targeted."""
  stacked = "layers" in path
  layers = range(num_layers) if stacked else [None]
  outcomes = set()
  for i in layers:
    name = hf_name(path, i)
    if not _target_hit(spec.target_modules, name):
      outcomes.add(None)
      continue
    outcomes.add((int(_pattern_value(spec.rank_pattern, name, spec.r)),
                  float(_pattern_value(spec.alpha_pattern, name, spec.alpha))))
  if len(outcomes) > 1:
    raise ValueError(
        f"config.peft: target_modules/rank_pattern/alpha_pattern treat "
        f"{hf_name(path, None)} differently in different layers ({sorted(map(str, outcomes))}); "
        "layers are stacked (nn.scan), so a pattern must select by module name, not layer index")
  return outcomes.pop()


def scaling(spec: AdapterSpec, rank: int, alpha: float) -> float:
  """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
  return alpha / math.sqrt(rank) if spec.use_rslora else alpha / rank


def _get(cfg, key, default):
  if cfg is None:
    return default
  if hasattr(cfg, "get"):
    v = cfg.get(key, default)
  else:
    v = getattr(cfg, key, default)
  return default if v is None and default is not None else v


def method_of(peft_cfg) -> str:
  method = _get(peft_cfg, "method", "none") or "none"
  if method not in METHODS:
    raise ValueError(f"config.peft.method={method!r}: unknown (known: {METHODS})")
  return method


def spec_from_config(peft_cfg) -> Optional[AdapterSpec]:
  """AdapterSpec from `config.peft` (ConfigDict/dict); None for method none/hft."""
  method = method_of(peft_cfg)
  if method in ("none", "hft"):
    return None
  target = name_list(_get(peft_cfg, "target_modules", "all-linear"), "target_modules")
  save = name_list(_get(peft_cfg, "modules_to_save", ()) or (), "modules_to_save")
  save = tuple(t for t in ((save,) if isinstance(save, str) else save) if t)
  def pattern(key):
    v = _get(peft_cfg, key, {}) or {}
    return tuple(sorted(dict(v.to_dict() if hasattr(v, "to_dict") else v).items()))
  quantize = _get(peft_cfg, "quantize", None) or None  # '' / 'none' in configs mean off
  quantize = None if quantize == "none" else quantize
  if method == "qlora":
    quantize = quantize or "nf4"
  return AdapterSpec(
      r=int(_get(peft_cfg, "r", 8)), alpha=float(_get(peft_cfg, "alpha", 16.0)),
      dropout=float(_get(peft_cfg, "dropout", 0.0)), target_modules=target,
      rank_pattern=pattern("rank_pattern"), alpha_pattern=pattern("alpha_pattern"),
      use_rslora=bool(_get(peft_cfg, "use_rslora", False)),
      use_dora=bool(_get(peft_cfg, "use_dora", False)) or method == "dora",
      quantize=quantize, block_size=int(_get(peft_cfg, "block_size", 64)),
      double_quant=bool(_get(peft_cfg, "double_quant", False)), modules_to_save=save)
