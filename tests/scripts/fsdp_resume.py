"""A short P3O run under FSDP2 on 2 CPU processes, with checkpoints, resume and export.

Usage: ``fsdp_resume.py OUT_DIR EPOCHS [CKPT]`` (run by tests/test_fsdp.py). Full fine-tuning
(the frozen reference is a sharded copy) against a reward computed from the tokens; checkpoints (one
file holding the full state dict, written by rank 0) every 2 steps under OUT_DIR/ckpt (a
rollout is 4 steps, so some are taken mid-rollout, with each rank's buffer in them),
the policy exported to OUT_DIR/policy at the end. Rank 0 writes the gathered final weights
and the rollout counts to OUT_DIR/result.pt.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from lit_p3o import ModelSpec, OptimizerSpec, P3OModule, RolloutSpec, SamplingSpec
from lit_p3o.cli import close_process_group
from lit_p3o.models import full_state_dict

sys.path.insert(0, str(Path(__file__).parents[1]))
from micro import MICRO_ARCH  # noqa: E402


class TokenScorer:
    """A reward that varies between responses of the micro model (the gold reward scores all
    of its babble alike, which would leave every update at zero)."""

    def score_examples(self, examples, ended, prompts=None):
        return torch.tensor([(sum(e.response_ids) % 7) / 7.0 for e in examples])


def main(out: Path, epochs: int, ckpt: str | None) -> None:
    L.seed_everything(0)
    stage = P3OModule(
        ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews"),
        "embedded:reviews",
        rollout=RolloutSpec(
            prompt_pool=16,
            num_prompts=2,
            num_responses=2,
            update_epochs=2,
            minibatch_groups=1,
            max_prompt_tokens=16,
            sampling=SamplingSpec(max_new_tokens=6),
            log_samples=0,
        ),
        optimizer=OptimizerSpec(learning_rate=1e-2),
        save_dir=str(out / "policy"),
    )
    stage.scorer = TokenScorer()
    initial = {k: v.clone() for k, v in stage.policy.state_dict().items()}
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False),
        callbacks=[
            ModelCheckpoint(dirpath=out / "ckpt", save_top_k=-1, every_n_train_steps=2, save_on_train_epoch_end=False)
        ],
    )
    trainer.fit(stage, ckpt_path=ckpt)
    weights = full_state_dict(stage.policy)
    if trainer.is_global_zero:
        torch.save(
            {"weights": weights, "initial": initial, "rollouts": stage.buffer.rollouts, "step": trainer.global_step},
            out / "result.pt",
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    try:
        main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
    finally:
        close_process_group()
