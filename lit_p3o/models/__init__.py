"""Models: the one place that turns configuration into networks, and writes them back out.

- :mod:`~lit_p3o.models.specs`: :class:`ModelSpec` and its sections (what configs hold);
- :mod:`~lit_p3o.models.factory`: building/loading models and tokenizers, π_ref;
- :mod:`~lit_p3o.models.saving`: :func:`save_pretrained` (exports);
- :mod:`~lit_p3o.models.sharding`: FSDP2 sharding and gathering of one model.

Every public name is importable from ``lit_p3o.models`` as before the split.
"""

from lit_p3o.models.factory import (
    FrozenReference,
    as_spec,
    bitsandbytes_optimizer,
    build_causal_lm,
    build_reward_model,
    check_model_source,
    disable_dropout,
    has_adapters,
    load_tokenizer,
    looks_local,
    python_objects,
)
from lit_p3o.models.saving import save_pretrained
from lit_p3o.models.sharding import full_state_dict, full_weights, is_sharded, shard_model
from lit_p3o.models.specs import LoraSpec, ModelSource, ModelSpec, QuantizationSpec

__all__ = [
    "FrozenReference",
    "LoraSpec",
    "ModelSource",
    "ModelSpec",
    "QuantizationSpec",
    "as_spec",
    "bitsandbytes_optimizer",
    "build_causal_lm",
    "build_reward_model",
    "check_model_source",
    "disable_dropout",
    "full_state_dict",
    "full_weights",
    "has_adapters",
    "is_sharded",
    "load_tokenizer",
    "looks_local",
    "python_objects",
    "save_pretrained",
    "shard_model",
]
