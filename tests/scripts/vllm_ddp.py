"""Three P3O rollouts under DDP or FSDP2 (argument 2: ddp | fsdp) on 2 CPU processes with ``rollout.sampling.backend: vllm`` (run
by tests/test_vllm_rollout.py). Each rank writes OUT/rank<r>.pt: per rollout, the largest gap
between its engine's log-probs and its live policy's, and its responses."""

import dataclasses
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared test helpers

from test_vllm import ARCH, GREEDY  # noqa: E402

import lit_p3o.vllm_engine as vllm_engine  # noqa: E402
from lit_p3o import ModelSpec, OptimizerSpec, P3OModule, RolloutSpec  # noqa: E402
from lit_p3o.cli import close_process_group  # noqa: E402
from lit_p3o.data.encoding import collate  # noqa: E402
from lit_p3o.generation import response_logprobs  # noqa: E402

gaps: list[float] = []
sample = vllm_engine.vllm_sample


def spy(model, tokenizer, prompts, spec, stop_ids, progress=None):
    sampled = sample(model, tokenizer, prompts, spec, stop_ids, progress)
    with torch.no_grad():
        policy = response_logprobs(model, collate(sampled.examples, tokenizer.pad_token_id), spec.temperature)
    gaps.append(max((row[: len(lp)] - lp).abs().max().item() for row, lp in zip(policy, sampled.logprobs)))
    return sampled


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main(out: str, strategy: str) -> None:
    vllm_engine.vllm_sample = spy
    L.seed_everything(0)
    stage = P3OModule(
        ModelSpec(architecture=dict(ARCH), tokenizer="embedded:reviews"),
        "embedded:reviews",
        rollout=RolloutSpec(
            prompt_pool=32,
            num_prompts=4,
            num_responses=2,
            update_epochs=1,
            minibatch_groups=2,
            max_prompt_tokens=16,
            sampling=dataclasses.replace(GREEDY, backend="vllm", top_k=0, max_new_tokens=6),
            log_samples=0,
        ),
        optimizer=OptimizerSpec(learning_rate=1e-2),
    )
    stage.scorer.score_examples = lambda examples, ended, prompts=None: torch.arange(len(examples)).float()
    initial = whole(stage.policy.lm_head.weight.detach()).clone()
    if strategy == "fsdp":
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(stage)
    torch.save(
        {
            "gaps": gaps,
            "moved": not torch.equal(initial, whole(stage.policy.lm_head.weight.detach())),
            "responses": [g.responses for g in stage.buffer.groups],
        },
        Path(out) / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    try:
        main(sys.argv[1], sys.argv[2])
    finally:
        close_process_group()
