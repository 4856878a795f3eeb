"""Time P3O iterations at fixed shapes and split the time honestly.

Shapes (issue 4): tiny Llama (2 layers, hidden 128, 4 heads), 8 prompts × K=2, 16-word
prompts, 32 new tokens, update_epochs 1, a reward model of the same size. Prints
completions/s, generated tokens/s, the split between generation, scoring, log-prob passes
and the update inside real Lightning iterations, peak RSS, and the ratio of an iteration to
the same model calls and optimizer step measured on their own, between the iterations (the
target is ≤ 1.10).

    python benchmarks/p3o_iteration.py [--iterations 10] [--device cpu|cuda] [--dtype float32|bfloat16]
        [--size small|large] [--prompts 8] [--k 2] [--compile auto|true|false]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import lightning as L
import torch

import lit_p3o.forwards as forwards_module
import lit_p3o.rollout as rollout_module
from lit_p3o import ModelSpec, OptimizerSpec, P3OModule, RolloutSpec, SamplingSpec
from lit_p3o.data.encoding import collate
from lit_p3o.generation import response_logprobs, sample_responses
from lit_p3o.models import build_reward_model, load_tokenizer, save_pretrained
from lit_p3o.stages.base import RLStage
from lit_p3o.tasks import get_task

SIZES = {  # the reference shapes (issue 4) and a larger model (~17M parameters) for issue 12
    "small": {
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 128,
    },
    "large": {
        "model_type": "llama",
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "max_position_embeddings": 128,
    },
}
PROMPTS, K, PROMPT_WORDS, NEW_TOKENS = 8, 2, 16, 32


class Timer:
    """Accumulates wall time per named phase (synchronising CUDA so the split is real)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.totals[name] += time.perf_counter() - start

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)

        return timed


def count_generated_tokens(stage: RLStage) -> list[int]:
    """A list that receives, at every rollout, the number of tokens the stage generated."""
    generated: list[int] = []
    fill = stage.buffer.fill

    def counting_fill(groups):
        generated.append(sum(len(r) for g in groups for r in g.responses))
        fill(groups)

    stage.buffer.fill = counting_fill
    return generated


def sixteen_word_prompts() -> list[str]:
    words = [w for w in get_task("reviews").build_tokenizer().get_vocab() if not w.startswith("<")]
    return [" ".join(words[(7 * i + j) % len(words)] for j in range(PROMPT_WORDS)) for i in range(64)]


def build_stage(args: argparse.Namespace, workdir: str) -> P3OModule:
    arch = SIZES[args.size]
    tokenizer = load_tokenizer(ModelSpec(architecture=arch, tokenizer="embedded:reviews"))
    reward = build_reward_model(ModelSpec(architecture=arch, tokenizer="embedded:reviews"), tokenizer)
    save_pretrained(reward, tokenizer, f"{workdir}/reward")
    prompts_file = f"{workdir}/prompts.jsonl"
    with open(prompts_file, "w") as f:
        for p in sixteen_word_prompts():
            f.write(f'{{"prompt": "{p}"}}\n')
    return P3OModule(
        ModelSpec(architecture=arch, tokenizer="embedded:reviews", dtype=args.dtype),
        f"{workdir}/reward",
        rollout=RolloutSpec(
            prompts=prompts_file,
            prompt_pool=None,
            num_prompts=args.prompts,
            num_responses=args.k,
            update_epochs=1,
            minibatch_groups=args.prompts,
            max_prompt_tokens=32,
            sampling=SamplingSpec(
                max_new_tokens=NEW_TOKENS, compile={"true": True, "false": False}.get(args.compile, "auto")
            ),
            log_samples=0,
        ),
        optimizer=OptimizerSpec(learning_rate=1e-5),
    )


class IterationClock(L.Callback):
    """Wall time of each whole iteration (rollout + update) and of the update alone; after each
    measured iteration, ``between`` (if given) runs outside the clock."""

    def __init__(self, timer: Timer, warmup: int, between: Callable[[], None] | None = None) -> None:
        self.timer, self.warmup, self.iterations, self._start = timer, warmup, [], 0.0
        self.between = between

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # runs before the rollout callback's
        if trainer.current_epoch == self.warmup:
            self.timer.totals.clear()  # the split covers measured iterations only
        self._start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._update_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.timer.totals["update (forward+backward+step)"] += time.perf_counter() - self._update_start

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.iterations.append(time.perf_counter() - self._start)
        if self.between is not None and trainer.current_epoch >= self.warmup:
            self.between()


class IsolatedCalls:
    """Generate + the forwards, backward and optimizer step an iteration needs, each timed on
    its own (the optimizer is the one the run trains with). Called between the loop's
    iterations, so that both see the same machine: a shared machine's speed drifts over a run,
    and calls timed after the loop came out 20% faster than the same calls in it."""

    def __init__(self, stage: P3OModule, score_examples: Callable) -> None:
        self.stage, self.score_examples = stage, score_examples  # the scorer's own, not the split's wrapper
        tok, spec = stage.tokenizer, stage.rollout_spec
        self.prompts = [
            tok(p)["input_ids"] for p in sixteen_word_prompts()[: spec.num_prompts] for _ in range(spec.num_responses)
        ]
        self.samples: dict[str, list[float]] = defaultdict(list)  # seconds per call, per repeat

    def __call__(self) -> None:
        stage, tok, spec = self.stage, self.stage.tokenizer, self.stage.rollout_spec
        optimizer = stage.trainer.optimizers[0]
        timer = Timer()
        with timer.phase("generate"):
            sampled = sample_responses(stage.policy, tok, self.prompts, spec.sampling, spec.generation_batch_size)
        batch = collate(sampled.examples, tok.pad_token_id).to(stage.device)
        with timer.phase("forwards"), torch.no_grad():
            if not (spec.on_policy and spec.defer_logp_old):  # else the update's forward gives logp_old
                response_logprobs(stage.policy, batch)
            with stage.reference.active() as ref:
                response_logprobs(ref, batch)
            self.score_examples(sampled.examples, sampled.ended)
        with timer.phase("update"):
            loss = response_logprobs(stage.policy, batch).sum()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for name, seconds in timer.totals.items():
            self.samples[name].append(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--size", default="small", choices=list(SIZES))
    parser.add_argument("--prompts", type=int, default=PROMPTS, help="prompts per rollout (at most 64)")
    parser.add_argument("--k", type=int, default=K, help="responses per prompt")
    parser.add_argument("--no-isolated", action="store_true", help="skip timing the calls alone")
    parser.add_argument("--compile", default="auto", choices=["auto", "true", "false"], help="SamplingSpec.compile")
    args = parser.parse_args()
    L.seed_everything(0)
    timer = Timer()
    with tempfile.TemporaryDirectory() as workdir:
        stage = build_stage(args, workdir)
        rollout_module.sample_responses = timer.wrap("generation", rollout_module.sample_responses)
        forwards_module.response_logprobs = timer.wrap(
            "logprob passes (ref; old if replayed)", forwards_module.response_logprobs
        )
        score_examples = stage.scorer.score_examples
        stage.scorer.score_examples = timer.wrap("reward scoring", score_examples)
        isolated = None if args.no_isolated else IsolatedCalls(stage, score_examples)
        clock = IterationClock(timer, args.warmup, between=isolated)
        trainer = L.Trainer(
            accelerator=args.device,
            devices=1,
            max_epochs=args.warmup + args.iterations,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[clock],
        )
        generated = count_generated_tokens(stage)
        trainer.fit(stage)
        measured = clock.iterations[args.warmup :]
        per_iter = sum(measured) / len(measured)
        tokens = sum(generated[args.warmup :]) / len(measured)

    print(f"device {args.device}, dtype {args.dtype}, torch threads {torch.get_num_threads()}")
    print(
        f"shapes: {args.prompts} prompts x K={args.k}, {PROMPT_WORDS}-word prompts, {NEW_TOKENS} new tokens, "
        f"Llama {SIZES[args.size]['num_hidden_layers']}x{SIZES[args.size]['hidden_size']}"
    )
    print(
        f"iteration: {per_iter * 1000:.1f} ms  |  completions/s {args.prompts * args.k / per_iter:.1f}  |  "
        f"generated tokens/s {tokens / per_iter:.1f} ({tokens:.0f} tokens/iteration)"
    )
    print("split per iteration:")
    accounted = 0.0
    for name, total in sorted(timer.totals.items(), key=lambda kv: -kv[1]):
        share = total / len(measured)
        accounted += share
        print(f"  {name:<34} {share * 1000:8.1f} ms  {share / per_iter:6.1%}")
    print(
        f"  {'other (Lightning, collation, logs)':<34} {(per_iter - accounted) * 1000:8.1f} ms  "
        f"{(per_iter - accounted) / per_iter:6.1%}"
    )
    if isolated is not None:
        report_isolated(isolated.samples, measured)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def report_isolated(isolated: dict[str, list[float]], measured: list[float]) -> None:
    """The iteration against the same calls alone, from means and from medians (the medians
    shrug off the odd slow iteration or call a shared machine produces)."""
    for label, average in (("mean", statistics.fmean), ("median", statistics.median)):
        alone = {name: average(seconds) for name, seconds in isolated.items()}
        parts = ", ".join(f"{name} {t * 1000:.1f} ms" for name, t in alone.items())
        print(
            f"isolated calls ({label}): {parts}; total {sum(alone.values()) * 1000:.1f} ms -> "
            f"iteration / isolated = {average(measured) / sum(alone.values()):.2f} (target <= 1.10)"
        )


if __name__ == "__main__":
    main()
