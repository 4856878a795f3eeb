"""What π_ref costs: peak RSS of P3O iterations with and without the reference, full and LoRA.

Four runs, each in its own subprocess so each peak RSS is its own, at the shapes of
``p3o_iteration.py`` (``--size`` small or large; 8 prompts x K=2, 32 new tokens, one
update pass): full fine-tuning and LoRA (r=8 on every linear projection), each with the
reference and "policy only" (the reference pass replaced by zeros, so nothing of π_ref
is ever allocated: no deep copy, no forward). Prints the weight bytes of each network, the
peak RSS of every run, and what the reference adds over policy-only; with LoRA, π_ref is
the policy with its adapters disabled, so it should cost (almost) nothing.

    python benchmarks/memory.py [--size small|large] [--iterations 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent


def unique_bytes(*modules) -> int:
    """Bytes of the distinct tensor storages held by ``modules`` (shared weights count once)."""
    seen, total = set(), 0
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def child(args: argparse.Namespace) -> None:
    import lightning as L
    import torch

    sys.path.insert(0, str(HERE))
    from p3o_iteration import NEW_TOKENS, PROMPTS, SIZES, K, sixteen_word_prompts

    import lit_p3o.forwards as forwards_module
    from lit_p3o import LoraSpec, ModelSpec, OptimizerSpec, P3OModule, RolloutSpec, SamplingSpec
    from lit_p3o.models import build_reward_model, load_tokenizer, save_pretrained

    L.seed_everything(0, verbose=False)
    workdir = Path(args.workdir)
    arch = SIZES[args.size]
    tokenizer = load_tokenizer(ModelSpec(architecture=arch, tokenizer="embedded:reviews"))
    if not (workdir / "reward").exists():
        save_pretrained(
            build_reward_model(ModelSpec(architecture=arch, tokenizer="embedded:reviews"), tokenizer),
            tokenizer,
            workdir / "reward",
        )
        with open(workdir / "prompts.jsonl", "w") as f:
            f.writelines(json.dumps({"prompt": p}) + "\n" for p in sixteen_word_prompts())
    lora = LoraSpec(r=8, lora_dropout=0.0, target_modules="all-linear") if args.lora else None
    reference = args.reference
    if not reference:  # policy only: no deep copy is ever made, the reference pass returns zeros
        reference_logprobs = forwards_module.response_logprobs
        import lit_p3o.stages.base as base

        class NoReference(torch.nn.Module):
            @contextmanager
            def active(self):
                yield self

        base.FrozenReference = lambda policy: NoReference()

        def logprobs(model, batch, temperature=1.0):
            if isinstance(model, NoReference):
                return torch.zeros(batch.input_ids.shape[0], batch.input_ids.shape[1] - batch.prompt_width)
            return reference_logprobs(model, batch, temperature)

        forwards_module.response_logprobs = logprobs
    stage = P3OModule(
        ModelSpec(architecture=arch, tokenizer="embedded:reviews", lora=lora),
        str(workdir / "reward"),
        rollout=RolloutSpec(
            prompts=str(workdir / "prompts.jsonl"),
            prompt_pool=None,
            num_prompts=PROMPTS,
            num_responses=K,
            update_epochs=1,
            minibatch_groups=PROMPTS,
            max_prompt_tokens=32,
            sampling=SamplingSpec(max_new_tokens=NEW_TOKENS),
            log_samples=0,
        ),
        optimizer=OptimizerSpec(learning_rate=1e-5),
    )
    weights = {
        "policy": unique_bytes(stage.policy),
        "reference (beyond the policy)": unique_bytes(stage.policy, stage.reference) - unique_bytes(stage.policy),
        "reward model": unique_bytes(stage.reward_model),
    }
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.iterations,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(stage)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"weights": weights, "peak_rss_mib": peak}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["small", "large"])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for lora in (False, True):
            for reference in (True, False):
                command = (
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        "--workdir",
                        workdir,
                        "--size",
                        args.size,
                        "--iterations",
                        str(args.iterations),
                    ]
                    + ["--lora"] * lora
                    + ["--reference"] * reference
                )
                done = subprocess.run(command, capture_output=True, text=True)
                lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                if done.returncode != 0 or not lines:
                    raise RuntimeError(f"run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
                result = json.loads(lines[-1][len("RESULT ") :])
                results[lora, reference] = result
                mib = {k: f"{v / 2**20:.2f} MiB" for k, v in result["weights"].items()}
                print(
                    f"{'LoRA' if lora else 'full'} {'with reference' if reference else 'policy only   '}: "
                    f"peak RSS {result['peak_rss_mib']:.0f} MiB; weights {mib}",
                    flush=True,
                )
    for lora in (False, True):
        with_ref, alone = results[lora, True]["peak_rss_mib"], results[lora, False]["peak_rss_mib"]
        print(
            f"{'LoRA' if lora else 'full'}: the reference adds {with_ref - alone:+.0f} MiB "
            f"({with_ref / alone - 1:+.1%}) to the policy-only peak RSS"
        )


if __name__ == "__main__":
    main()
