"""lit-p3o: Pairwise Proximal Policy Optimization and the RLHF pipeline, in PyTorch Lightning."""

import torch

from lit_p3o.buffer import Group, ReplayBuffer, RolloutBatch
from lit_p3o.data.preferences import EmbeddedPreferenceSpec, PreferenceDataModule
from lit_p3o.data.sft import SFTDataModule
from lit_p3o.evaluation import CompletionReport, CompletionWriter, EvaluationSpec, FrontierCallback, evaluate_policy
from lit_p3o.generation import SamplingSpec, VLLMSpec
from lit_p3o.guards import GradientGuard, GuardSpec
from lit_p3o.models import (
    FrozenReference,
    LoraSpec,
    ModelSpec,
    QuantizationSpec,
    build_causal_lm,
    build_reward_model,
    load_tokenizer,
)
from lit_p3o.optim import OptimizerSpec
from lit_p3o.rollout import KLSpec, RolloutCallback, RolloutSpec
from lit_p3o.scoring import GoldScorer, RewardScorer, RewardSpec
from lit_p3o.stages.dpo import OnlineDPOModule
from lit_p3o.stages.grpo import GRPOModule
from lit_p3o.stages.p3o import P3OModule
from lit_p3o.stages.ppo import PPOModule
from lit_p3o.stages.reward import RewardModule
from lit_p3o.stages.rloo import RLOOModule
from lit_p3o.stages.sft import SFTModule

# Checkpoints hold these config/buffer classes (hyperparameters, replay buffer); allow them
# so that `trainer.fit(ckpt_path=...)` works with torch.load(weights_only=True).
torch.serialization.add_safe_globals(
    [
        Group,
        EvaluationSpec,
        GuardSpec,
        KLSpec,
        LoraSpec,
        ModelSpec,
        OptimizerSpec,
        QuantizationSpec,
        RewardSpec,
        RolloutSpec,
        SamplingSpec,
        VLLMSpec,
        EmbeddedPreferenceSpec,
    ]
)
# Checkpoints written before lit_p3o.models became a package name the specs by their old path.
torch.serialization.add_safe_globals(
    [(spec, f"lit_p3o.models.{spec.__name__}") for spec in (LoraSpec, ModelSpec, QuantizationSpec)]
)

__all__ = [
    "CompletionReport",
    "CompletionWriter",
    "EmbeddedPreferenceSpec",
    "EvaluationSpec",
    "FrontierCallback",
    "FrozenReference",
    "GRPOModule",
    "GoldScorer",
    "GradientGuard",
    "Group",
    "GuardSpec",
    "KLSpec",
    "LoraSpec",
    "ModelSpec",
    "OnlineDPOModule",
    "OptimizerSpec",
    "P3OModule",
    "PPOModule",
    "PreferenceDataModule",
    "QuantizationSpec",
    "RLOOModule",
    "ReplayBuffer",
    "RewardModule",
    "RewardScorer",
    "RewardSpec",
    "RolloutBatch",
    "RolloutCallback",
    "RolloutSpec",
    "SFTDataModule",
    "SFTModule",
    "SamplingSpec",
    "VLLMSpec",
    "build_causal_lm",
    "build_reward_model",
    "evaluate_policy",
    "load_tokenizer",
]
