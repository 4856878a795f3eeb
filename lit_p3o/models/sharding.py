"""FSDP2 sharding of one model and the gathering of its weights (for export and tests); the
stages apply it through :class:`lit_p3o.stages.sharding.ShardableModule`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel


def is_sharded(model: nn.Module) -> bool:
    """True when FSDP (2 or 1) manages some part of ``model``: its forwards are collectives,
    so every rank must make each of them."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def shard_model(model: nn.Module, mesh: Any, mp_policy: Any | None = None) -> None:
    """Apply FSDP2 ``fully_shard`` over the data-parallel ``mesh``, in place.

    A transformers model (also under a peft wrapper, whose LoRA weights live inside it) gets
    one unit per decoder layer (the classes it lists in ``_no_split_modules``), one for a
    sequence-classification model's backbone and one for its head (``reward_scores`` calls
    them separately), and the root for the rest (embeddings, final norm, a tied or untied LM
    head). Any other module is sharded child by child; a module with weights of its own (a
    value head) becomes one unit. Frozen modules are sharded the same way: they need no
    gradients, only the memory saving.
    """
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(hf, PreTrainedModel):
        layer_classes = set(getattr(hf, "_no_split_modules", None) or ())
        layers = [m for m in hf.modules() if type(m).__name__ in layer_classes]
        if not layers:
            raise ValueError(
                f"shard_model: {type(hf).__name__} names no decoder-layer class in `_no_split_modules`; "
                "cannot shard it layer by layer"
            )
        for layer in layers:
            fully_shard(layer, **kwargs)
        if getattr(hf.config, "num_labels", None) == 1 and hasattr(hf, "score"):
            fully_shard(getattr(hf, hf.base_model_prefix), **kwargs)
            fully_shard(hf.score, **kwargs)
        fully_shard(hf, **kwargs)
        return
    for child in model.children():
        if any(True for _ in child.parameters()):
            shard_model(child, mesh, mp_policy)
    if any(True for _ in model.parameters(recurse=False)):
        fully_shard(model, **kwargs)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """``model``'s state dict with every weight whole, on CPU.

    Under FSDP every rank must call this (the shards are gathered with collectives); rank 0
    gets the state dict, the other ranks None. An unsharded model just returns its own.
    """
    if not is_sharded(model):
        return model.state_dict()
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if dist.get_rank() == 0 else None


def full_weights(model: nn.Module, rebuild: Any) -> nn.Module | None:
    """The model with all its weights in memory, for ``save_pretrained``.

    An unsharded model is returned as it is. Under FSDP every rank must call this; rank 0 gets
    ``rebuild()`` (a fresh, unsharded model of the same spec) loaded with the gathered weights,
    strictly, so no weight is missing from the export; the other ranks get None.
    """
    if not is_sharded(model):
        return model
    state = full_state_dict(model)
    if state is None:
        return None
    full = rebuild()
    full.load_state_dict(state, strict=True)
    return full
