"""Two updates of an RL stage on a fixed buffer, on 1 process, under DDP or under FSDP2.

Usage: ``fixed_buffer_step.py OUT DEVICES [ddp|fsdp] [p3o|grpo]`` (run by tests/test_ddp.py,
tests/test_fsdp.py and tests/test_grpo.py). The buffer is built deterministically and
identically on every rank, before any sharding; with 2 devices each rank keeps its own half of
the groups, as a real rollout would give it. For GRPO (DAPO loss) the responses are cut to 2-5
tokens by group, so each rank's half holds a different number of tokens. Rank 0 writes the
loss it logged (reduced across ranks), the token count of every rank's groups and the updated
policy weights (gathered in full under FSDP2) to OUT.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lit_p3o import GRPOModule, ModelSpec, OptimizerSpec, P3OModule, RolloutSpec, SamplingSpec
from lit_p3o.buffer import Group
from lit_p3o.cli import close_process_group
from lit_p3o.data.prompts import load_prompts
from lit_p3o.models import full_state_dict
from lit_p3o.rollout import gather_from_ranks, rollout

sys.path.insert(0, str(Path(__file__).parents[1]))
from micro import MICRO_ARCH  # noqa: E402

GROUPS = 8


def p3o_groups(groups: list[Group]) -> None:
    for g in groups:
        g.scores.normal_()  # varied scores so every pair has a gradient
        g.rewards.copy_(g.scores - 0.1 * g.kl)


def grpo_groups(groups: list[Group]) -> None:
    for i, g in enumerate(groups):
        n = 2 + i % 4
        g.responses = [r[:n] for r in g.responses]
        g.logp_old = [t[:n] for t in g.logp_old]
        g.logp_ref = [t[:n] for t in g.logp_ref]
        g.scores.normal_()  # varied scores so every group has a gradient
        g.rewards.copy_(g.scores)


# stage: (class, its extra arguments, β of the rollout, how the groups are shaped)
STAGES = {
    "p3o": (P3OModule, {}, 0.1, p3o_groups),
    "grpo": (GRPOModule, {"loss_type": "dapo"}, 0.0, grpo_groups),
}


def fixed_buffer(name: str) -> type:
    """The stage ``name`` without the rollout callback: the buffer is filled once before fit."""
    stage_class, _, beta, shape = STAGES[name]

    class FixedBuffer(stage_class):
        def configure_callbacks(self):
            return []

        def setup(self, stage: str) -> None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
            torch.manual_seed(1234)  # same groups on every rank
            groups = rollout(self, load_prompts("embedded:reviews", "train", GROUPS), beta, self.rollout_spec)
            shape(groups)
            self.buffer.fill(groups[rank::world])
            self.tokens_by_rank = gather_from_ranks(sum(len(r) for g in self.buffer.groups for r in g.responses))

    return FixedBuffer


def main(out: str, devices: int, strategy: str, name: str) -> None:
    L.seed_everything(0)
    per_rank = GROUPS // devices
    stage = fixed_buffer(name)(
        ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews"),
        "embedded:reviews",
        **STAGES[name][1],
        rollout=RolloutSpec(
            prompt_pool=GROUPS,
            num_prompts=per_rank,
            num_responses=2,
            update_epochs=2,
            minibatch_groups=per_rank,
            max_prompt_tokens=16,
            sampling=SamplingSpec(max_new_tokens=6),
            defer_logp_old=name == "p3o",
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
        args = sys.argv[1:]
        main(args[0], int(args[1]), args[2] if len(args) > 2 else "ddp", args[3] if len(args) > 3 else "p3o")
    finally:
        close_process_group()
