"""One real on-policy P3O rollout + update under DDP (run by tests/test_ddp.py).

Each rank samples its own prompts (eagerly or through the compiled decode, argv[3]), skips
the ``logp_old`` pass (on-policy) and updates. Rank 0 writes its sampled responses and the
updated policy weights to OUT.
"""

import sys

import lightning as L
import torch

from lit_p3o import ModelSpec, OptimizerSpec, P3OModule, RolloutSpec, SamplingSpec
from lit_p3o.cli import close_process_group

MICRO = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def varied_scores(examples, ended, prompts=None):
    """Scores that depend on the sampled tokens, so the update depends on what was sampled."""
    return torch.tensor([float(sum(e.response_ids) % 7) for e in examples])


def main(out: str, devices: int, compile_: bool) -> None:
    L.seed_everything(0)
    stage = P3OModule(
        ModelSpec(architecture=MICRO, tokenizer="embedded:reviews"),
        "embedded:reviews",
        rollout=RolloutSpec(
            prompt_pool=16,
            num_prompts=4,
            num_responses=2,
            update_epochs=1,
            minibatch_groups=4,
            max_prompt_tokens=16,
            sampling=SamplingSpec(max_new_tokens=6, compile=compile_),
        ),
        optimizer=OptimizerSpec(learning_rate=1e-2),
    )
    with torch.no_grad():
        stage.policy.model.embed_tokens.weight.normal_(std=0.5)  # peaked: varied lengths, some EOS
    stage.reference.copy.load_state_dict(stage.policy.state_dict())
    stage.scorer.score_examples = varied_scores
    ratio_max = []  # on-policy minibatches do not log their (constant) ratio statistics
    compute_loss = stage.compute_loss

    def recording(*args):
        loss, stats = compute_loss(*args)
        ratio_max.append(float(stats["ratio_max"]))
        return loss, stats

    stage.compute_loss = recording
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(stage)
    if trainer.is_global_zero:
        torch.save(
            {
                "responses": [g.responses for g in stage.buffer.groups],
                "ratio_max": max(ratio_max),
                "weights": {k: v.detach().clone() for k, v in stage.policy.state_dict().items()},
            },
            out,
        )


if __name__ == "__main__":
    try:
        main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "compiled")
    finally:
        close_process_group()
