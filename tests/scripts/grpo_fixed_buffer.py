"""Two GRPO (DAPO loss) updates on a fixed buffer, on 1 process, under DDP or under FSDP2.

Usage: ``grpo_fixed_buffer.py OUT DEVICES [ddp|fsdp]`` (run by tests/test_grpo.py). The buffer
is built identically on every rank, its responses cut to 2-5 tokens by group, so each rank's
half of the groups holds a different number of tokens; with 2 devices each rank keeps its own
half. Rank 0 writes the logged loss (reduced across ranks), the token count of every rank's
groups and the updated policy weights (gathered in full under FSDP2) to OUT.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lit_p3o import GRPOModule, ModelSpec, OptimizerSpec, RolloutSpec, SamplingSpec
from lit_p3o.cli import close_process_group
from lit_p3o.data.prompts import load_prompts
from lit_p3o.models import full_state_dict
from lit_p3o.rollout import gather_from_ranks, rollout

sys.path.insert(0, str(Path(__file__).parents[1]))
from micro import MICRO_ARCH  # noqa: E402

GROUPS = 8


class FixedBufferGRPO(GRPOModule):
    """GRPO without the rollout callback: the buffer is filled once before fit."""

    def configure_callbacks(self):
        return []

    def setup(self, stage: str) -> None:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        torch.manual_seed(1234)  # same groups on every rank
        groups = rollout(self, load_prompts("embedded:reviews", "train", GROUPS), 0.0, self.rollout_spec)
        for i, g in enumerate(groups):
            n = 2 + i % 4
            g.responses = [r[:n] for r in g.responses]
            g.logp_old = [t[:n] for t in g.logp_old]
            g.logp_ref = [t[:n] for t in g.logp_ref]
            g.scores.normal_()  # varied scores so every group has a gradient
            g.rewards.copy_(g.scores)
        self.buffer.fill(groups[rank::world])
        self.tokens_by_rank = gather_from_ranks(sum(len(r) for g in self.buffer.groups for r in g.responses))


def main(out: str, devices: int, strategy: str) -> None:
    L.seed_everything(0)
    per_rank = GROUPS // devices
    stage = FixedBufferGRPO(
        ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews"),
        "embedded:reviews",
        loss_type="dapo",
        rollout=RolloutSpec(
            prompt_pool=GROUPS,
            num_prompts=per_rank,
            num_responses=2,
            update_epochs=2,
            minibatch_groups=per_rank,
            max_prompt_tokens=16,
            sampling=SamplingSpec(max_new_tokens=6),
            defer_logp_old=False,
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
                "tokens_by_rank": stage.tokens_by_rank,
                "weights": {k: v.detach().clone() for k, v in weights.items()},
            },
            out,
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    try:
        main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "ddp")
    finally:
        close_process_group()
