"""Does ``SamplingSpec.compile`` pay off? Eager and compiled generation, interleaved.

At the rollout shapes of ``p3o_iteration.py`` (8 prompts x K=2 in one ``generate()`` call,
16-word prompts, 32 new tokens; ``--size`` small or large), one process alternates eager
and compiled calls with the same seeds for ``--rounds`` rounds, after timing the compiled
path's first call (compilation included). Prints the medians, the saving per call, the
number of rollouts after which compiling has paid for itself, and the projected time of
``--rollouts`` rollouts' generation either way. The load average is printed too: on a busy
machine the figures are noise.

    python benchmarks/compile_generation.py [--size small|large] [--rounds 10] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from p3o_iteration import NEW_TOKENS, PROMPTS, SIZES, K, sixteen_word_prompts

from lit_p3o import ModelSpec, SamplingSpec
from lit_p3o.generation import sample_responses
from lit_p3o.models import build_causal_lm, load_tokenizer


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=list(SIZES))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--rollouts", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    spec = ModelSpec(architecture=SIZES[args.size], tokenizer="embedded:reviews")
    tokenizer = load_tokenizer(spec)
    model = build_causal_lm(spec, tokenizer).to(args.device)
    prompts = [tokenizer(p)["input_ids"] for p in sixteen_word_prompts()[:PROMPTS] for _ in range(K)]
    specs = {
        mode: SamplingSpec(max_new_tokens=NEW_TOKENS, compile=mode == "compiled") for mode in ("eager", "compiled")
    }

    def generate(mode: str, seed: int) -> None:
        torch.manual_seed(seed)
        sample_responses(model, tokenizer, prompts, specs[mode])

    generate("eager", 0)  # warm-up (allocator, first-call costs)
    first_compiled = timed(lambda: generate("compiled", 0))
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for r in range(args.rounds):
        for mode in ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager"):
            times[mode].append(timed(lambda mode=mode, r=r: generate(mode, r + 1)))
    eager, compiled = statistics.median(times["eager"]), statistics.median(times["compiled"])
    compile_cost = first_compiled - compiled
    saving = eager - compiled
    print(
        f"size {args.size}, device {args.device}, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.2f} (1 min)"
    )
    print(f"eager    per call: median {eager * 1000:7.1f} ms  ({' '.join(f'{t * 1000:.0f}' for t in times['eager'])})")
    print(
        f"compiled per call: median {compiled * 1000:7.1f} ms  "
        f"({' '.join(f'{t * 1000:.0f}' for t in times['compiled'])})"
    )
    print(
        f"first compiled call {first_compiled:.1f} s -> compilation ~{compile_cost:.1f} s; "
        f"saving per call {saving * 1000:.1f} ms ({eager / compiled:.2f}x)"
    )
    if saving > 0:
        print(f"break-even after {compile_cost / saving:.0f} rollouts of one generate() call")
    print(
        f"{args.rollouts} rollouts of generation: eager {args.rollouts * eager:.1f} s, "
        f"compiled {compile_cost + args.rollouts * compiled:.1f} s (compilation included)"
    )


if __name__ == "__main__":
    main()
