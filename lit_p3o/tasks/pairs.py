"""The embedded task's labelled preference pairs: sample K responses per prompt from a saved SFT
policy and label each pair like noisy people would, ``P(a ≻ b) = σ((gold(a) − gold(b)) / T)``.
This builds and runs a policy, so it lives with the tasks, not in the data layer
(:class:`~lit_p3o.data.preferences.PreferenceDataModule` calls it for ``"embedded:<task>"``)."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from lit_p3o.data.encoding import Encoded, Pair
from lit_p3o.generation import SamplingSpec, sample_responses
from lit_p3o.models import ModelSpec, build_causal_lm, load_tokenizer
from lit_p3o.tasks import Task


@dataclass
class EmbeddedPreferenceSpec:
    """How the embedded task's preference pairs are made.

    ``policy`` is the saved SFT model that writes the responses; ``label_temperature`` T sets
    the labelling noise (smaller = more decisive labellers). ``sampling_temperatures`` spreads
    the responses: prompt i's responses are sampled at ``sampling_temperatures[i % len]`` (all
    at the same temperature), so a value above 1 shows the reward model the flawed texts (repeats,
    off-topic or unfinished sentences) that a policy drifting from SFT writes.
    ``responses_per_prompt`` K > 2 samples K responses per training prompt and labels all
    K(K−1)/2 pairs among them, each by its own draw; a batch then holds whole prompts' groups,
    so each response is scored once for its K − 1 comparisons. Held-out pairs stay one per
    prompt, so that their accuracy is over independent comparisons.
    """

    policy: str = "outputs/demo/sft"
    train_pairs: int = 4000
    val_pairs: int = 500
    label_temperature: float = 0.5
    max_new_tokens: int = 32
    generation_batch_size: int = 256
    sampling_temperatures: list[float] = field(default_factory=lambda: [1.0])
    responses_per_prompt: int = 2

    def __post_init__(self) -> None:
        if self.label_temperature <= 0:
            raise ValueError(f"EmbeddedPreferenceSpec.label_temperature: must be > 0, got {self.label_temperature}")
        if not self.sampling_temperatures or min(self.sampling_temperatures) <= 0:
            raise ValueError(
                f"EmbeddedPreferenceSpec.sampling_temperatures: needs values > 0, got {self.sampling_temperatures}"
            )
        if self.train_pairs < 1 or self.val_pairs < 1:
            raise ValueError("EmbeddedPreferenceSpec: train_pairs and val_pairs must be >= 1")
        if self.responses_per_prompt < 2:
            raise ValueError(
                f"EmbeddedPreferenceSpec.responses_per_prompt: must be >= 2, got {self.responses_per_prompt}"
            )

    @property
    def pairs_per_prompt(self) -> int:
        """Training pairs labelled per prompt: K(K−1)/2 for K responses."""
        return math.comb(self.responses_per_prompt, 2)


def sample_labelled_pairs(*args: Any, **kwargs: Any) -> tuple[list[Pair], float]:
    """``n_pairs`` independent pairs, one per prompt, and their Bayes accuracy: what held-out
    accuracy is measured on. :func:`sample_labelled_groups` with two responses per prompt; it
    takes that function's arguments (whose signature holds their types) but ``responses_per_prompt``."""
    groups, ceiling = sample_labelled_groups(*args, responses_per_prompt=2, **kwargs)
    return [pair for group in groups for pair in group], ceiling


def sample_labelled_groups(
    task: Task,
    spec: EmbeddedPreferenceSpec,
    split: str,
    n_pairs: int,
    seed: int,
    expected_vocab: dict[str, int] | None = None,
    responses_per_prompt: int = 2,
    progress: str | None = None,
) -> tuple[list[list[Pair]], float]:
    """Sample ``responses_per_prompt`` (K) responses per prompt from ``spec.policy`` and label
    every pair of distinct ones by its own Bradley–Terry draw on the gold reward, K(K−1)/2
    pairs per prompt (InstructGPT's K-wise comparisons: more labels per sampled response).
    Returns ``n_pairs`` pairs grouped by prompt, and their Bayes accuracy. A ``progress`` label
    shows a progress bar over the generation chunks."""
    if responses_per_prompt < 2:
        raise ValueError(f"responses_per_prompt: must be >= 2, got {responses_per_prompt}")
    model_spec = ModelSpec(name_or_path=spec.policy)
    tokenizer = load_tokenizer(model_spec)
    if expected_vocab is not None and tokenizer.get_vocab() != expected_vocab:
        raise ValueError(f"EmbeddedPreferenceSpec.policy: {spec.policy!r} uses another tokenizer than the reward model")
    policy = build_causal_lm(model_spec, tokenizer)
    temperatures, k = spec.sampling_temperatures, responses_per_prompt
    rng = random.Random(seed)
    torch.manual_seed(seed)
    groups: list[list[Pair]] = []
    made, ceiling = 0, 0.0
    per_prompt = math.comb(k, 2)
    n_prompts = math.ceil(n_pairs / per_prompt)
    prompts = task.prompts(split, n_prompts)
    for attempt in range(4):  # identical responses are dropped; top up a few times
        need = n_pairs - made
        if need == 0:
            break
        batch_prompts = [prompts[(attempt * n_prompts + i) % len(prompts)] for i in range(math.ceil(need / per_prompt))]
        examples: list[Encoded] = [None] * (k * len(batch_prompts))  # type: ignore[list-item]
        ended: list[bool] = [False] * len(examples)
        for t, temperature in enumerate(temperatures):
            rows = [r for i in range(t, len(batch_prompts), len(temperatures)) for r in range(k * i, k * i + k)]
            if not rows:
                continue
            ids = [tokenizer(batch_prompts[r // k], add_special_tokens=True)["input_ids"] for r in rows]
            sampling = SamplingSpec(max_new_tokens=spec.max_new_tokens, temperature=temperature)
            sampled = sample_responses(policy, tokenizer, ids, sampling, spec.generation_batch_size, progress=progress)
            for r, example, stop in zip(rows, sampled.examples, sampled.ended):
                examples[r], ended[r] = example, stop
        for i, prompt in enumerate(batch_prompts):
            distinct = {tuple(examples[r].response_ids): r for r in reversed(range(k * i, k * i + k))}
            rows = sorted(distinct.values())  # the first of identical responses, in sampling order
            gold = {
                r: task.gold_reward(
                    prompt, tokenizer.decode(examples[r].response_ids, skip_special_tokens=True), ended[r]
                )
                for r in rows
            }
            group = []
            for a, b in itertools.combinations(rows, 2):
                if made == n_pairs:
                    break
                p_a = _sigmoid((gold[a] - gold[b]) / spec.label_temperature)
                ceiling += max(p_a, 1.0 - p_a)
                group.append(draw_label(examples[a], examples[b], p_a, rng))
                made += 1
            if group:
                groups.append(group)
    if not groups:
        raise RuntimeError(f"{spec.policy}: every sampled pair was identical; the SFT policy is degenerate")
    return groups, ceiling / made


def draw_label(a: Encoded, b: Encoded, p_a: float, rng: random.Random) -> Pair:
    """One labeller's verdict on ``a`` against ``b``: ``a`` is chosen with probability ``p_a``,
    and the pair keeps the probability of its chosen side as ``preference``."""
    return Pair(a, b, preference=p_a) if rng.random() < p_a else Pair(b, a, preference=1.0 - p_a)


def _sigmoid(x: float) -> float:
    """``1 / (1 + e^-x)`` without overflow: tiny label temperatures make ``|x|`` huge."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)
