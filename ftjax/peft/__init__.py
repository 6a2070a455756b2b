"""Parameter-efficient fine-tuning as transforms of the Linear layer and of the param pytree.

`adapt_linear` is the hook `ftjax.models.layers.Linear` calls: without an adapter spec on the
ModelConfig it is a plain matmul; with one it adds LoRA / rsLoRA / DoRA and/or an NF4 base kernel
(lora.py, nf4.py). `declare_embed_adapter` / `adapt_embed` do the same for the token embedding
(`ftjax.models.layers.Embed`); the LM head is a Linear (`lm_head`). Pytree transforms (tree.py):
`apply_peft`, `init_adapters`, `trainable_mask`, `split_trainable`/`merge_trainable`, `merge`.
PEFT-format I/O (io.py): `export_adapter`, `load_adapter`. Half Fine-Tuning (hft.py): `hft_mask`,
`hft_update_scale_fn`.

config.peft keys: method (none | lora | dora | qlora | hft), r, alpha, dropout, target_modules
(list of names, regex string or 'all-linear'; 'embed_tokens' and 'lm_head' are targeted by name),
modules_to_save (names of modules trained in full; a reward model's 'score' head always is),
rank_pattern, alpha_pattern (dicts), use_rslora, use_dora, quantize (None | 'nf4'), block_size
(64), double_quant; HFT: round_len, seed.
"""

from ftjax.peft.hft import hft_mask, hft_update_scale_fn
from ftjax.peft.lora import (adapt_embed, adapt_linear, adapters_are_disabled, adapters_disabled,
                             declare_embed_adapter)
from ftjax.peft.spec import AdapterSpec, spec_from_config
from ftjax.peft.tree import (apply_peft, available_modules, init_adapters, merge,
                             merge_trainable, split_trainable, trainable_mask)
from ftjax.peft.io import export_adapter, load_adapter  # pylint: disable=g-bad-import-order

__all__ = [
    "AdapterSpec", "adapt_embed", "adapt_linear", "adapters_are_disabled", "adapters_disabled",
    "apply_peft", "available_modules", "declare_embed_adapter", "export_adapter", "hft_mask",
    "hft_update_scale_fn", "init_adapters", "load_adapter", "merge", "merge_trainable",
    "spec_from_config", "split_trainable", "trainable_mask",
]
