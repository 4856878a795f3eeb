"""FSDP2 for every stage: ``configure_model`` and the export of gathered weights, written once.

Under Lightning's ``ModelParallelStrategy`` (FSDP2 ``fully_shard``; CPU with gloo or GPUs)
Lightning calls ``configure_model`` with ``self.device_mesh`` set; under any other strategy
the mesh is None and nothing happens, so stages stay unaware of the strategy.

Mixed precision follows the trainer's ``precision``: ``bf16-mixed`` becomes FSDP2's
``MixedPrecisionPolicy`` (bfloat16 weights in every forward, float32 gradient reduction).
The policy acts on the sharded modules themselves, so the rollout's forwards (generation,
``logp_old``, ``logp_ref``, scores) see the same numerics as the update's; ``bf16-true``
casts the weights themselves (Lightning's plugin) and ``32-true`` keeps float32.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_p3o.models import full_weights, is_sharded, save_pretrained, shard_model
from lit_p3o.runs import use_atomic_checkpoints, write_error


class ShardableModule(L.LightningModule):
    """A LightningModule whose networks FSDP2 can shard (see the module docstring), and
    whose checkpoints and exports are written atomically (:mod:`lit_p3o.runs`)."""

    def setup(self, stage: str) -> None:
        use_atomic_checkpoints(self.trainer)

    def configure_model(self) -> None:
        mesh = self.device_mesh
        if mesh is None or is_sharded(self):  # not FSDP2, or already sharded (fit after validate)
            return
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                "ModelParallelStrategy.tensor_parallel_size: lit-p3o shards over data parallelism only (FSDP2); "
                "set tensor_parallel_size=1 and data_parallel_size to the number of processes"
            )
        dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        policy = None
        if str(self.trainer.precision) == "bf16-mixed":
            from torch.distributed.fsdp import MixedPrecisionPolicy

            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for child in self.children():
            if any(True for _ in child.parameters()):
                shard_model(child, dp_mesh, policy)

    def export_pretrained(
        self, model: nn.Module, rebuild: Callable[[], nn.Module], tokenizer: PreTrainedTokenizerBase, directory: str
    ) -> Path | None:
        """``save_pretrained`` on rank 0 (None elsewhere); every rank must call it (sharded
        weights are gathered, and the ranks wait until the directory is written).

        ``rebuild`` makes a fresh unsharded model of the same spec to hold the gathered weights.
        """
        full = full_weights(model, rebuild)
        path = None
        if self.trainer.is_global_zero:
            try:
                path = save_pretrained(full, tokenizer, directory)
            except OSError as err:  # a full disk, or a directory that holds something else
                raise write_error("model.init_args.save_dir", directory, err) from err
        self.trainer.strategy.barrier("export_pretrained")  # the directory is complete for every rank after
        return path
