"""Every stage under FSDP2 (ModelParallelStrategy) on 2 CPU processes (run by tests/test_fsdp.py).

Usage: ``fsdp_stages.py OUT_DIR``. In one pair of processes: SFT (exported to OUT_DIR/sft),
the reward model (exported to OUT_DIR/reward), PPO with LoRA and a value head against that
reward model (sharded too), online DPO and RLOO with full fine-tuning (a sharded frozen
reference copy). The RL stages sample with a different ``max_new_tokens`` per rank, so ranks
finish generating at different steps. Rank 0 writes OUT_DIR/summary.json.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy

from lit_p3o import (
    LoraSpec,
    ModelSpec,
    OnlineDPOModule,
    OptimizerSpec,
    PPOModule,
    PreferenceDataModule,
    RewardModule,
    RLOOModule,
    RolloutSpec,
    SamplingSpec,
    SFTDataModule,
    SFTModule,
)
from lit_p3o.cli import close_process_group
from lit_p3o.models import is_sharded

sys.path.insert(0, str(Path(__file__).parents[1]))
from micro import MICRO_ARCH  # noqa: E402

TRL = Path(__file__).parents[1] / "fixtures" / "trl_preference.jsonl"


class UnequalLengths(L.Callback):
    """Rank r samples up to 2 + 6r tokens (the micro model rarely emits EOS): unequal lengths."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.rollout_spec.sampling = SamplingSpec(max_new_tokens=2 + 6 * trainer.global_rank)


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def rl_summary(stage) -> dict:
    lengths = sorted({len(r) for g in stage.buffer.groups for r in g.responses})
    gathered = [None, None]
    dist.all_gather_object(gathered, lengths)
    return {"sharded": is_sharded(stage.policy), "lengths_by_rank": gathered, "rollouts": stage.buffer.rollouts}


def main(out: Path) -> None:
    summary = {}
    spec = lambda **kw: ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews", **kw)  # noqa: E731
    optimizer = OptimizerSpec(learning_rate=1e-2)

    L.seed_everything(0)
    sft = SFTModule(spec(), optimizer, save_dir=str(out / "sft"))
    t = trainer(max_steps=2, limit_val_batches=0)
    t.fit(sft, SFTDataModule(embedded_size=16, val_fraction=0.0, max_length=48, batch_size=4))
    summary["sft"] = {"steps": t.global_step, "sharded": is_sharded(sft.policy)}

    reward = RewardModule(ModelSpec(name_or_path=str(out / "sft")), optimizer, save_dir=str(out / "reward"))
    t = trainer(max_steps=1, limit_val_batches=0)
    t.fit(reward, PreferenceDataModule(train=str(TRL), val_fraction=0.0, max_length=64, batch_size=1))
    summary["reward"] = {"steps": t.global_step, "sharded": is_sharded(reward.reward_model)}

    rollout = RolloutSpec(
        prompt_pool=16,
        num_prompts=2,
        num_responses=2,
        update_epochs=1,
        minibatch_groups=2,
        max_prompt_tokens=16,
        log_samples=0,
    )
    ppo = PPOModule(
        spec(lora=LoraSpec(r=2, lora_dropout=0.0)), str(out / "reward"), rollout=rollout, optimizer=optimizer
    )
    t = trainer(max_epochs=1, callbacks=[UnequalLengths()])
    t.fit(ppo)
    summary["ppo"] = {
        **rl_summary(ppo),
        "steps": t.global_step,
        "reward_model_sharded": is_sharded(ppo.reward_model),
        "value_head_sharded": is_sharded(ppo.value_head),
    }

    for name, cls in (("dpo", OnlineDPOModule), ("rloo", RLOOModule)):
        stage = cls(spec(), "embedded:reviews", rollout=rollout, optimizer=optimizer)
        t = trainer(max_epochs=1, callbacks=[UnequalLengths()])
        t.fit(stage)
        summary[name] = {**rl_summary(stage), "steps": t.global_step, "reference_sharded": is_sharded(stage.reference)}
    if t.is_global_zero:
        (out / "summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    torch.set_num_threads(1)
    try:
        main(Path(sys.argv[1]))
    finally:
        close_process_group()
