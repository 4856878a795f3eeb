"""P3O iterations on GPUs at a ~1B-parameter scale: bf16 + LoRA, 4-bit + LoRA, DDP and FSDP2.

    python benchmarks/gpu_scaling.py --setup lora-bf16|lora-4bit|ddp|fsdp2 [--iterations 5]

Not run on CPU (it refuses without CUDA). The policy is a Llama built from ``ARCH`` (TinyLlama's
layer shapes: about 0.97B parameters, nearly all in the 22 decoder layers, as the embedded
task's vocabulary is tiny), randomly initialised and saved
once to a temporary directory (4-bit weights are quantized while loading a saved model); the
reward is the embedded task's gold reward, so no reward model is needed. ``ddp`` and ``fsdp2``
use every GPU present (full fine-tuning, ``bf16-mixed``; FSDP2 via ModelParallelStrategy).
Prints seconds per iteration (rollout + update), generated tokens/s and each rank's peak GPU
memory. Record figures in docs/benchmarks.md with the card's name.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lit_p3o import LoraSpec, ModelSpec, OptimizerSpec, P3OModule, QuantizationSpec, RolloutSpec, SamplingSpec
from lit_p3o.models import build_causal_lm, load_tokenizer, save_pretrained

ARCH = {
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
}


class IterationTimer(L.Callback):
    """Wall time of every epoch (= one rollout + its updates) and the tokens it generated."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)
        self.tokens.append(sum(len(r) for g in pl_module.buffer.groups for r in g.responses))


def saved_base(workdir: str) -> str:
    spec = ModelSpec(architecture=dict(ARCH), tokenizer="embedded:reviews", dtype="bfloat16")
    tokenizer = load_tokenizer(spec)
    model = build_causal_lm(spec, tokenizer)
    print(f"[gpu_scaling] policy: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")
    return str(save_pretrained(model, tokenizer, f"{workdir}/base"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", required=True, choices=["lora-bf16", "lora-4bit", "ddp", "fsdp2"])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=32, help="prompts per GPU per rollout")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_scaling.py: needs CUDA GPUs (use benchmarks/p3o_iteration.py on CPU)")
    L.seed_everything(0)
    with tempfile.TemporaryDirectory() as workdir:
        base = saved_base(workdir)
        lora = LoraSpec(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        policy = {
            "lora-bf16": ModelSpec(name_or_path=base, dtype="bfloat16", lora=lora),
            "lora-4bit": ModelSpec(
                name_or_path=base,
                dtype="bfloat16",
                lora=lora,
                quantization=QuantizationSpec(bits=4, compute_dtype="bfloat16"),
            ),
            "ddp": ModelSpec(name_or_path=base),
            "fsdp2": ModelSpec(name_or_path=base),
        }[args.setup]
        stage = P3OModule(
            policy,
            "embedded:reviews",
            rollout=RolloutSpec(
                prompt_pool=4096,
                num_prompts=args.prompts,
                num_responses=2,
                update_epochs=1,
                minibatch_groups=8,
                sampling=SamplingSpec(max_new_tokens=64),
                log_samples=0,
            ),
            optimizer=OptimizerSpec(learning_rate=1e-5),
        )
        gpus = torch.cuda.device_count() if args.setup in ("ddp", "fsdp2") else 1
        strategy = {"ddp": "ddp", "fsdp2": ModelParallelStrategy(data_parallel_size=gpus, tensor_parallel_size=1)}
        timer = IterationTimer()
        trainer = L.Trainer(
            accelerator="gpu",
            devices=gpus,
            strategy=strategy.get(args.setup, "auto"),
            precision="bf16-mixed" if args.setup in ("ddp", "fsdp2") else "32-true",
            max_epochs=args.iterations,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            callbacks=[timer],
        )
        trainer.fit(stage)
        peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=stage.device)
        peaks = trainer.strategy.all_gather(peak).flatten().tolist() if gpus > 1 else [peak.item()]
        if trainer.is_global_zero:
            steady = timer.times[1:] or timer.times  # the first iteration includes warm-up
            seconds = sum(steady) / len(steady)
            print(
                f"[gpu_scaling] {args.setup} on {gpus} x {torch.cuda.get_device_name()}: "
                f"{seconds:.2f} s/iteration, {sum(timer.tokens[1:] or timer.tokens) / sum(steady) * gpus:.0f} "
                f"generated tokens/s (all GPUs), peak memory per GPU {', '.join(f'{p:.1f}' for p in peaks)} GiB"
            )


if __name__ == "__main__":
    main()
