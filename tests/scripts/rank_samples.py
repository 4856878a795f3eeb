"""One P3O rollout under DDP on 2 CPU processes where both ranks get the same prompt (run by
tests/test_ddp.py). Each rank writes its prompts and sampled responses to OUT/rank<r>.pt."""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from lit_p3o import ModelSpec, P3OModule, RolloutSpec, SamplingSpec
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


def main(out: str) -> None:
    out_dir = Path(out)
    prompts = out_dir / "prompts.jsonl"  # the same prompt on every line: each rank's shard holds it
    if not prompts.exists():
        prompts.write_text("".join(json.dumps({"prompt": "write a review of the pizza :"}) + "\n" for _ in range(4)))
    L.seed_everything(0)
    stage = P3OModule(
        ModelSpec(architecture=MICRO, tokenizer="embedded:reviews"),
        "embedded:reviews",
        rollout=RolloutSpec(
            prompts=str(prompts),
            prompt_pool=None,
            num_prompts=2,
            num_responses=2,
            update_epochs=1,
            minibatch_groups=2,
            max_prompt_tokens=16,
            sampling=SamplingSpec(max_new_tokens=8),
        ),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(stage)
    torch.save(
        {
            "prompts": [g.prompt_ids for g in stage.buffer.groups],
            "responses": [g.responses for g in stage.buffer.groups],
        },
        out_dir / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    finally:
        close_process_group()
