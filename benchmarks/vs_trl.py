"""lit-p3o against TRL's ``RLOOTrainer``, side by side on identical models and shapes.

Both sides start from the same saved policy and reward model (a Llama of ``--size``: the
reference shapes of ``p3o_iteration.py``, or 4 layers x 512) and train on the same 64
16-word prompts: 8 prompts x K=2 completions per iteration, 32 new tokens at most,
temperature 1 with no top-k/top-p, one update pass in one minibatch (TRL:
``num_iterations=1``, ``steps_per_generation=1``), KL coefficient 0.05 folded into the
reward, ratio clipping 0.2, AdamW at a constant learning rate without gradient clipping,
no gradient checkpointing, the same dtype. TRL's logging, saving, evaluation and
completion logging are off.

Each side runs in its own subprocess (so its peak RSS is its own), the sides alternate
(the order flips every round) for ``--rounds`` rounds, round ``r`` sampling under seed
``--seed + r`` on both sides (so the length of the sampled responses, which is luck, varies
over rounds instead of repeating), and each run times ``--iterations``
iterations after ``--warmup`` unmeasured ones, an iteration being the wall time from the
end of one optimizer step to the end of the next (generation, scoring, log-prob passes,
update and the loop around them). Prints every run's completions/s, generated tokens/s
(EOS included, padding not) and peak RSS, then the medians and the median of the
per-round ratios lit-p3o / TRL.

    pip install -e ".[bench]"
    python benchmarks/vs_trl.py [--size small|large] [--rounds 5] [--iterations 10] [--lit-compile auto|true|false]
                                [--lit-backend hf|vllm]  # vllm: in an environment with `.[vllm,bench]`
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BETA, CLIP, LEARNING_RATE = 0.05, 0.2, 1e-5
COMPILE = {"auto": "auto", "true": True, "false": False}


def prepare(workdir: Path, size: str, seed: int) -> None:
    """Save the shared policy, reward model (same architecture) and prompts under ``workdir``."""
    import lightning as L

    sys.path.insert(0, str(HERE))
    from p3o_iteration import SIZES, sixteen_word_prompts

    from lit_p3o.models import ModelSpec, build_causal_lm, build_reward_model, load_tokenizer, save_pretrained

    L.seed_everything(seed, verbose=False)
    spec = ModelSpec(architecture=SIZES[size], tokenizer="embedded:reviews")
    tokenizer = load_tokenizer(spec)
    save_pretrained(build_causal_lm(spec, tokenizer), tokenizer, workdir / "policy")
    save_pretrained(build_reward_model(spec, tokenizer), tokenizer, workdir / "reward")
    with open(workdir / "prompts.jsonl", "w") as f:
        for prompt in sixteen_word_prompts():
            f.write(json.dumps({"prompt": prompt}) + "\n")


def iteration_seconds(stamps: list[float], warmup: int) -> list[float]:
    """Durations between successive end-of-step stamps, the first ``warmup`` steps left out."""
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :])]


def run_lit(workdir: Path, args: argparse.Namespace) -> dict[str, float]:
    import lightning as L

    sys.path.insert(0, str(HERE))
    from p3o_iteration import NEW_TOKENS, PROMPTS, K, count_generated_tokens

    from lit_p3o import KLSpec, ModelSpec, OptimizerSpec, RLOOModule, RolloutSpec, SamplingSpec

    L.seed_everything(args.seed, verbose=False)
    stage = RLOOModule(
        ModelSpec(name_or_path=str(workdir / "policy"), dtype=args.dtype),
        str(workdir / "reward"),
        clip_epsilon=CLIP,
        rollout=RolloutSpec(
            prompts=str(workdir / "prompts.jsonl"),
            prompt_pool=None,
            num_prompts=PROMPTS,
            num_responses=K,
            update_epochs=1,
            minibatch_groups=PROMPTS,
            max_prompt_tokens=32,
            sampling=SamplingSpec(
                max_new_tokens=NEW_TOKENS, compile=COMPILE[args.lit_compile], backend=args.lit_backend
            ),
            log_samples=0,
        ),
        kl=KLSpec(beta=BETA),
        optimizer=OptimizerSpec(learning_rate=LEARNING_RATE),
        seed=args.seed,
    )
    generated = count_generated_tokens(stage)
    stamps: list[float] = []

    class Stamp(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:  # one epoch = one iteration
            stamps.append(time.perf_counter())

    trainer = L.Trainer(
        accelerator=args.device,
        devices=1,
        max_epochs=args.warmup + args.iterations + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Stamp()],
    )
    trainer.fit(stage)
    return summary(iteration_seconds(stamps, args.warmup), generated[args.warmup + 1 :], PROMPTS * K)


def run_trl(workdir: Path, args: argparse.Namespace) -> dict[str, float]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    K, NEW_TOKENS, PROMPTS = args.shapes  # noqa: N806 (the same names as p3o_iteration's constants)
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "policy")
    policy = AutoModelForCausalLM.from_pretrained(workdir / "policy", dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(workdir / "reward", num_labels=1, dtype=dtype)
    prompts = [json.loads(line)["prompt"] for line in open(workdir / "prompts.jsonl")]
    config = RLOOConfig(
        output_dir=str(workdir / "trl"),
        seed=args.seed,
        use_cpu=args.device == "cpu",
        per_device_train_batch_size=PROMPTS * K,
        num_generations=K,
        steps_per_generation=1,
        gradient_accumulation_steps=1,
        num_iterations=1,
        max_completion_length=NEW_TOKENS,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=BETA,
        epsilon=CLIP,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=0.0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        max_steps=args.warmup + args.iterations + 1,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        log_completions=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_, **__) -> None:
            stamps.append(time.perf_counter())

    trainer = RLOOTrainer(
        model=policy,
        reward_funcs=reward,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        reward_processing_classes=tokenizer,
        callbacks=[Stamp()],
    )
    generated: list[int] = []
    generate = trainer._generate_single_turn

    def counting_generate(*a, **kw):
        completion_ids = generate(*a, **kw)
        generated.append(sum(len(c) for c in completion_ids))
        return completion_ids

    trainer._generate_single_turn = counting_generate
    trainer.train()
    return summary(iteration_seconds(stamps, args.warmup), generated[args.warmup + 1 :], PROMPTS * K)


def summary(seconds: list[float], tokens: list[int], completions: int) -> dict[str, float]:
    per_iteration = sum(seconds) / len(seconds)
    return {
        "iteration_ms": per_iteration * 1000,
        "completions_per_s": completions / per_iteration,
        "tokens_per_s": sum(tokens) / len(tokens) / per_iteration,
        "tokens_per_iteration": sum(tokens) / len(tokens),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def child(args: argparse.Namespace) -> None:
    result = (run_lit if args.side == "lit" else run_trl)(Path(args.workdir), args)
    print("RESULT " + json.dumps(result), flush=True)


def launch(side: str, workdir: Path, args: argparse.Namespace, seed: int) -> dict[str, float]:
    command = [
        sys.executable,
        __file__,
        "--side",
        side,
        "--workdir",
        str(workdir),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--iterations",
        str(args.iterations),
        "--warmup",
        str(args.warmup),
        "--seed",
        str(seed),
        "--lit-compile",
        args.lit_compile,
        "--lit-backend",
        args.lit_backend,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the {side} run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["small", "large"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lit-compile", default="auto", choices=["auto", "true", "false"], help="lit-p3o's SamplingSpec.compile"
    )
    parser.add_argument(
        "--lit-backend", default="hf", choices=["hf", "vllm"], help="lit-p3o's SamplingSpec.backend (docs/vllm.md)"
    )
    parser.add_argument("--side", choices=["lit", "trl"], help=argparse.SUPPRESS)  # a child run
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side is not None:
        sys.path.insert(0, str(HERE))
        from p3o_iteration import NEW_TOKENS, PROMPTS, K

        args.shapes = (K, NEW_TOKENS, PROMPTS)
        return child(args)

    figures = ("completions_per_s", "tokens_per_s", "peak_rss_mib")
    results: dict[str, list[dict[str, float]]] = {"lit": [], "trl": []}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        prepare(workdir, args.size, args.seed)
        for r in range(args.rounds):
            for side in ("trl", "lit") if r % 2 == 0 else ("lit", "trl"):
                # a seed per round, the same for both sides: how long the sampled responses run is
                # luck of the draw, and one seed for every round would repeat the same luck
                result = launch(side, workdir, args, args.seed + r)
                results[side].append(result)
                print(
                    f"round {r + 1} {side:>3}: {result['iteration_ms']:7.1f} ms/iteration  "
                    f"completions/s {result['completions_per_s']:7.1f}  generated tokens/s "
                    f"{result['tokens_per_s']:8.1f} ({result['tokens_per_iteration']:.0f}/iteration)  "
                    f"peak RSS {result['peak_rss_mib']:.0f} MiB",
                    flush=True,
                )

    print(
        f"\nsize {args.size}, device {args.device}, dtype {args.dtype}, lit-p3o compile {args.lit_compile}, "
        f"lit-p3o backend {args.lit_backend}, "
        f"{args.rounds} rounds x "
        f"{args.iterations} iterations (+{args.warmup} warm-up), {time.perf_counter() - start:.0f} s in all"
    )
    for name in figures:
        lit = [r[name] for r in results["lit"]]
        trl = [r[name] for r in results["trl"]]
        ratios = [a / b for a, b in zip(lit, trl)]
        print(
            f"{name:<18} lit-p3o median {statistics.median(lit):8.1f}  TRL median {statistics.median(trl):8.1f}  "
            f"lit/TRL per round {' '.join(f'{x:.2f}' for x in ratios)}  median {statistics.median(ratios):.2f}"
        )


if __name__ == "__main__":
    main()
