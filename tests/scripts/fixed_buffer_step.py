"""Two P3O updates on a fixed buffer, on 1 process, under DDP or under FSDP2.

Usage: ``fixed_buffer_step.py OUT DEVICES [ddp|fsdp]`` (run by tests/test_ddp.py and
tests/test_fsdp.py). The buffer is built deterministically and identically on every rank,
before any sharding; with 2 devices each rank keeps its own half of the groups, as a real
rollout would give it. Rank 0 writes the loss it logged (reduced across ranks) and the updated
policy weights (gathered in full under FSDP2) to OUT.
"""

import sys

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lit_p3o import ModelSpec, OptimizerSpec, P3OModule, RolloutSpec, SamplingSpec
from lit_p3o.cli import close_process_group
from lit_p3o.data.prompts import load_prompts
from lit_p3o.models import full_state_dict
from lit_p3o.rollout import rollout

MICRO = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
GROUPS = 8


class FixedBufferP3O(P3OModule):
    """P3O without the rollout callback: the buffer is filled once before fit."""

    def configure_callbacks(self):
        return []

    def setup(self, stage: str) -> None:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        torch.manual_seed(1234)  # same groups on every rank
        groups = rollout(self, load_prompts("embedded:reviews", "train", GROUPS), 0.1, self.rollout_spec)
        for g in groups:
            g.scores.normal_()  # varied scores so every pair has a gradient
            g.rewards.copy_(g.scores - 0.1 * g.kl)
        self.buffer.fill(groups[rank::world])


def main(out: str, devices: int, strategy: str) -> None:
    L.seed_everything(0)
    per_rank = GROUPS // devices
    stage = FixedBufferP3O(
        ModelSpec(architecture=MICRO, tokenizer="embedded:reviews"),
        "embedded:reviews",
        rollout=RolloutSpec(
            prompt_pool=GROUPS,
            num_prompts=per_rank,
            num_responses=2,
            update_epochs=2,
            minibatch_groups=per_rank,
            max_prompt_tokens=16,
            sampling=SamplingSpec(max_new_tokens=6),
        ),
        optimizer=OptimizerSpec(learning_rate=1e-2),
    )
    if strategy == "fsdp":
        strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy if devices > 1 else "auto",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(stage)
    weights = full_state_dict(stage.policy)  # every rank takes part in the gather under FSDP2
    if trainer.is_global_zero:
        torch.save(
            {
                "loss": float(trainer.callback_metrics["train/loss"]),
                "weights": {k: v.detach().clone() for k, v in weights.items()},
            },
            out,
        )


if __name__ == "__main__":
    try:
        main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "ddp")
    finally:
        close_process_group()
