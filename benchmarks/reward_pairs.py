"""Which training pairs bring the demo's reward model closest to its Bayes ceiling (issue 13)?

Trains ``RewardModule`` from the demo's SFT model on pairs drawn as ``configs/demo/reward.yaml``
draws them (Bradley–Terry labels on the gold reward at T = 0.25, 32 new tokens), ``--sft-pairs``
from the SFT policy and ``--drift-pairs`` from a second policy (``--drift-policy``, e.g. the
demo's P3O policy: it writes the repeated and off-topic sentences a drifting policy writes)
and ``--edited-pairs`` pairs of a sampled response and an edited copy of it, and measures it on
held-out pairs from the SFT policy, the ones the demo's figure uses:

- **acc**: accuracy against the drawn labels (what the reward stage prints);
- **E[acc]**: its expectation over the label draw, ``mean σ(±Δgold/T)`` on the side the model
  prefers; the **ceiling** is the same quantity for the gold ranking, so ``ceiling − E[acc]``
  is the gap free of label-draw noise;
- the same gap on pairs of two clean responses, on pairs with a flawed one, and by kind of
  flaw (unparseable, repeated or off-topic sentences; ``mixed`` for several kinds).

It first prints the same figures for a reference scorer that knows the gold sentiment of every
sentence and nothing of flaws: the floor a reward model reaches by learning sentiment alone.

    python benchmarks/reward_pairs.py --sft outputs/demo/sft --drift-policy outputs/demo/p3o \\
        [--sft-pairs 8000] [--drift-pairs 8000] [--epochs 3] [--lr 3e-4] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import random
import time
from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig

from lit_p3o import ModelSpec, OptimizerSpec, RewardModule
from lit_p3o.data.encoding import Batch, Encoded, collate
from lit_p3o.data.preferences import Pair, collate_pair_groups
from lit_p3o.generation import response_logprobs
from lit_p3o.models import build_causal_lm, build_reward_model, load_tokenizer
from lit_p3o.scoring import reward_scores
from lit_p3o.stages import reward as reward_stage
from lit_p3o.tasks import get_task, reviews
from lit_p3o.tasks.pairs import EmbeddedPreferenceSpec, _sigmoid, draw_label, sample_labelled_groups

LABEL_TEMPERATURE, VAL_PAIRS = 0.25, 1000


def groups_from(
    policy: str,
    split: str,
    n: int,
    seed: int,
    vocab: dict[str, int],
    temperatures: tuple[float, ...] = (1.0,),
    responses_per_prompt: int = 2,
) -> tuple[list[list[Pair]], float]:
    spec = EmbeddedPreferenceSpec(
        policy=policy,
        train_pairs=max(n, 1),
        val_pairs=1,
        label_temperature=LABEL_TEMPERATURE,
        max_new_tokens=32,
        sampling_temperatures=list(temperatures),
    )
    return sample_labelled_groups(get_task("reviews"), spec, split, n, seed, vocab, responses_per_prompt)


def pairs_from(
    policy: str, split: str, n: int, seed: int, vocab: dict[str, int], temperatures: tuple[float, ...] = (1.0,)
) -> tuple[list[Pair], float]:
    groups, ceiling = groups_from(policy, split, n, seed, vocab, temperatures)
    return [pair for group in groups for pair in group], ceiling


def edited_pairs(pairs: list[Pair], tokenizer, seed: int, balanced: bool = False) -> list[Pair]:
    """Experiment: each pair's second response replaced by an edited copy of its first, relabelled
    by Bradley–Terry on the gold reward: a response next to its own near miss, made without
    labels from generic text flaws (a repeated sentence, a sentence from another prompt's
    response, a word dropped, doubled or replaced). ``balanced`` edits never lengthen the
    response, so a shorter response is not a cue for the better one."""
    rng, period, eos = random.Random(seed), tokenizer.convert_tokens_to_ids("."), tokenizer.eos_token_id

    def sentences(ids: list[int]) -> list[list[int]]:
        out, current = [], []
        for token in ids:
            current.append(token)
            if token == period:
                out.append(current)
                current = []
        return out

    out = []
    for a, _ in pairs:
        body, ends = (
            (a.response_ids[:-1], a.response_ids[-1:]) if a.response_ids[-1:] == [eos] else (a.response_ids, [])
        )
        parts = sentences(body)
        tail = body[sum(map(len, parts)) :]  # an unfinished last sentence stays as it was
        donor = sentences([t for t in rng.choice(pairs)[0].response_ids if t != eos])
        if not parts or not donor or not _edit(parts, donor, rng, balanced):
            continue
        edited = Encoded(a.prompt_ids, [t for s in parts for t in s] + tail + ends)
        if edited.response_ids == a.response_ids:
            continue
        prompt = tokenizer.decode(a.prompt_ids, skip_special_tokens=True)
        gold = [
            reviews.gold_reward(prompt, tokenizer.decode(e.response_ids, skip_special_tokens=True), bool(ends))
            for e in (a, edited)
        ]
        out.append(draw_label(a, edited, _sigmoid((gold[0] - gold[1]) / LABEL_TEMPERATURE), rng))
    return out


def _edit(parts: list[list[int]], donor: list[list[int]], rng: random.Random, balanced: bool) -> bool:
    """One random edit of ``parts`` (sentences, each ending with its period) in place, using
    ``donor``'s sentences and words; False when the drawn edit does not apply."""
    i = rng.randrange(len(parts))
    donor_word = lambda: rng.choice([w for s in donor for w in s[:-1]])  # noqa: E731
    if balanced:
        others = [k for k in range(len(parts)) if k != i]
        j = rng.choice(others or [None])
        edit = rng.choice(("repeat", "splice", "replace", "cut") if others else ("splice", "replace"))
        if edit == "repeat":  # sentence i said again in place of sentence j
            parts[j] = list(parts[i])
        elif edit == "splice":  # a foreign sentence in place of sentence i
            parts[i] = rng.choice(donor)
        elif edit == "cut":
            del parts[i]
        elif len(parts[i]) > 1:
            k = rng.randrange(len(parts[i]) - 1)
            parts[i] = parts[i][:k] + [donor_word()] + parts[i][k + 1 :]
        return True
    edit = rng.choice(("repeat", "splice", "word"))
    if edit == "repeat":
        parts.insert(i + 1, list(parts[i]))
    elif edit == "splice":
        parts.insert(rng.randrange(len(parts) + 1), rng.choice(donor))
    elif len(parts[i]) > 1:
        words, k = parts[i][:-1], rng.randrange(len(parts[i]) - 1)
        how = rng.choice(("drop", "double", "replace"))
        if how == "drop":
            words = words[:k] + words[k + 1 :]
        elif how == "double":
            words = words[: k + 1] + words[k:]
        else:
            words = words[:k] + [donor_word()] + words[k + 1 :]
        parts[i] = words + parts[i][-1:]
    else:
        return False
    return True


def flaw_kinds(pairs: list[Pair], tokenizer) -> list[str]:
    """Each pair's kind: ``clean``, the kind of flaw its responses have (``unparseable``,
    ``repeated`` or ``off-topic`` sentences), or ``mixed`` for several kinds."""
    kinds = []
    for pair in pairs:
        prompt = tokenizer.decode(pair[0].prompt_ids, skip_special_tokens=True)
        texts = [tokenizer.decode(e.response_ids, skip_special_tokens=True) for e in pair]
        flaws = {kind for t in texts for kind, n in reviews.polarity_and_flaws(prompt, t)[1].items() if n}
        kinds.append("clean" if not flaws else flaws.pop() if len(flaws) == 1 else "mixed")
    return kinds


def summed_scores(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Experimental reward: the score head applied at every response token, summed over the
    response (the gold reward is a sum over sentences), instead of read at the last token."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False
    ).last_hidden_state
    return (model.score(hidden).squeeze(-1).float() * batch.response_mask).sum(dim=1)


@torch.no_grad()
def least_likely_token(policy_dir: str, tokenizer, pairs: list[Pair]) -> list[float]:
    """Per pair, the lowest log-probability the policy gives any response token of either
    response: a label-free sign that one of them strays from what the policy usually writes."""
    policy = build_causal_lm(ModelSpec(name_or_path=policy_dir), tokenizer).eval()
    lowest = []
    for i in range(0, len(pairs), 128):
        rows = [e for pair in pairs[i : i + 128] for e in pair]
        batch = collate(rows, tokenizer.pad_token_id)
        logp = response_logprobs(policy, batch)  # 0 off the response: never below a token's log-prob
        lowest += logp.min(dim=1).values.view(-1, 2).min(dim=1).values.tolist()
    return lowest


@torch.no_grad()
def model_margins(model: torch.nn.Module, pad: int, pairs: list[Pair], scores_of=reward_scores) -> list[float]:
    """``r(first) − r(second)`` of each pair under a reward model."""
    model.eval()
    margins = []
    for i in range(0, len(pairs), 64):
        chunk = pairs[i : i + 64]
        scores = scores_of(model, collate([c for c, _ in chunk] + [r for _, r in chunk], pad))
        chosen, rejected = scores.chunk(2)
        margins += (chosen - rejected).tolist()
    return margins


def flaw_blind_margins(pairs: list[Pair], tokenizer) -> list[float]:
    """Margins of a reference scorer that knows the gold sentiment of every sentence it can parse
    but nothing of flaws: ``tanh(S'/2)`` (minus 1 without EOS), where ``S'`` also counts
    repeated and off-topic sentences and unparseable ones count for nothing. A reward model
    that learned sentiment perfectly and flaws not at all scores like this."""

    def score(example) -> float:
        sentences, _ = reviews.split_sentences(tokenizer.decode(example.response_ids, skip_special_tokens=True))
        parsed = [reviews.parse_sentence(text) for text in sentences]
        ended = bool(example.response_ids) and example.response_ids[-1] == tokenizer.eos_token_id
        return math.tanh(sum(p.value for p in parsed if p) / 2) - (0.0 if ended else 1.0)

    return [score(a) - score(b) for a, b in pairs]


def evaluate(margins: list[float], pairs: list[Pair], kinds: list[str]) -> dict:
    """acc against the labels (chosen first), E[acc] and the ceiling from each pair's
    ``preference``, overall and by kind of pair; a tied margin counts as a coin flip."""
    out = {"acc": sum((m > 0) + 0.5 * (m == 0) for m in margins) / len(margins)}
    groups = {"all": lambda k: True, "clean": lambda k: k == "clean", "flawed": lambda k: k != "clean"}
    groups |= {kind: (lambda k, kind=kind: k == kind) for kind in sorted(set(kinds) - {"clean"})}
    for kind, keep in groups.items():
        rows = [(m, pair.preference) for m, pair, k in zip(margins, pairs, kinds) if keep(k)]
        expected = [p if m > 0 else 1.0 - p if m < 0 else 0.5 for m, p in rows]
        best = [max(p, 1.0 - p) for _, p in rows]
        out[kind] = (len(rows), sum(expected) / len(rows), sum(best) / len(rows))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", default="outputs/demo/sft")
    parser.add_argument("--drift-policy", default="outputs/demo/p3o")
    parser.add_argument("--sft-pairs", type=int, default=8000)
    parser.add_argument("--drift-pairs", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--temperatures",
        type=float,
        nargs="+",
        default=[1.0],
        help="sampling temperatures of the SFT training pairs, pair i at the (i mod n)-th",
    )
    parser.add_argument(
        "--layers",
        type=int,
        help="train a randomly initialised reward model of the SFT model's shape with this many layers",
    )
    parser.add_argument(
        "--width", type=int, help="with --layers: this hidden size (and 3x for the MLP) instead of the SFT model's"
    )
    parser.add_argument(
        "--edited-pairs",
        type=int,
        default=0,
        help="experiment: N more SFT pairs whose second response is an edited copy of the first",
    )
    parser.add_argument(
        "--balanced-edits",
        action="store_true",
        help="edits that keep the length or shorten: repeat over another sentence, swap in a foreign "
        "sentence, replace a word, cut a sentence",
    )
    parser.add_argument(
        "--keep-flawed",
        type=int,
        default=0,
        help="diagnostic that uses the gold reward to pick pairs: train on the first N sampled pairs "
        "with a flawed response (sample enough --sft-pairs) and --keep-clean clean ones",
    )
    parser.add_argument("--keep-clean", type=int, default=0)
    parser.add_argument(
        "--keep-unlikely",
        type=int,
        default=0,
        help="label-free selection: train on the N sampled pairs with the least likely response token "
        "under the SFT policy plus --keep-rest others drawn at random",
    )
    parser.add_argument("--keep-rest", type=int, default=0)
    parser.add_argument(
        "--pooling",
        choices=["last", "sum"],
        default="last",
        help="experiment: 'sum' trains and measures a per-token score summed over the response",
    )
    parser.add_argument(
        "--init-from", help="curriculum: go on training this saved reward model instead of starting from the SFT model"
    )
    parser.add_argument(
        "--responses-per-prompt",
        type=int,
        default=2,
        help="K-wise comparisons: K SFT responses per prompt, all K(K-1)/2 pairs labelled, batched "
        "by prompt (--sft-pairs counts pairs)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per batch")
    parser.add_argument("--evaluate", help="measure this saved reward model instead of training one")
    parser.add_argument(
        "--uncertainty-of",
        help="active-learning check: the share of flawed pairs and gold ties among the --sft-pairs "
        "sampled pairs this saved reward model is least and most sure of; trains nothing",
    )
    args = parser.parse_args()
    start = time.perf_counter()
    tokenizer = load_tokenizer(ModelSpec(name_or_path=args.sft))
    vocab = tokenizer.get_vocab()
    val, ceiling = pairs_from(args.sft, "test", VAL_PAIRS, 1, vocab)  # the demo's held-out pairs (seed 0 + 1)
    kinds = flaw_kinds(val, tokenizer)
    report(
        evaluate(flaw_blind_margins(val, tokenizer), val, kinds),
        ceiling,
        "reference: gold sentiment of every parseable sentence, blind to flaws",
    )
    if args.evaluate:
        model = build_reward_model(ModelSpec(name_or_path=args.evaluate), tokenizer)
        report(
            evaluate(model_margins(model, tokenizer.pad_token_id, val), val, kinds),
            ceiling,
            f"{args.evaluate} (as saved)",
        )
        return
    grouped = args.responses_per_prompt > 2
    if grouped and (args.drift_pairs or args.edited_pairs or args.keep_flawed or args.keep_unlikely):
        parser.error("--responses-per-prompt > 2 trains on SFT pairs only: set --drift-pairs 0, no edits or picks")
    sft_groups, _ = (
        groups_from(args.sft, "train", args.sft_pairs, args.seed, vocab, args.temperatures, args.responses_per_prompt)
        if args.sft_pairs
        else ([], 0.0)
    )
    train = [pair for group in sft_groups for pair in group]
    if args.uncertainty_of:
        report_uncertainty(build_reward_model(ModelSpec(name_or_path=args.uncertainty_of), tokenizer), train, tokenizer)
        return
    if args.drift_pairs:
        train += pairs_from(args.drift_policy, "train", args.drift_pairs, args.seed + 2, vocab)[0]
    if args.edited_pairs:
        train += edited_pairs(
            pairs_from(args.sft, "train", args.edited_pairs, args.seed + 3, vocab)[0],
            tokenizer,
            args.seed,
            args.balanced_edits,
        )
    random.Random(args.seed).shuffle(train)
    sampled = time.perf_counter() - start
    train_flawed = [k != "clean" for k in flaw_kinds(train, tokenizer)]
    if args.keep_unlikely:
        order = sorted(range(len(train)), key=least_likely_token(args.sft, tokenizer, train).__getitem__)
        rest = random.Random(args.seed).sample(order[args.keep_unlikely :], args.keep_rest)
        chosen = order[: args.keep_unlikely] + rest
        train, train_flawed = [train[i] for i in chosen], [train_flawed[i] for i in chosen]
    if args.keep_flawed:
        flawed = [p for p, f in zip(train, train_flawed) if f][: args.keep_flawed]
        train = flawed + [p for p, f in zip(train, train_flawed) if not f][: args.keep_clean]
        train_flawed = [True] * len(flawed) + [False] * (len(train) - len(flawed))

    L.seed_everything(args.seed, verbose=False)
    model = ModelSpec(name_or_path=args.init_from or args.sft)
    origin = f"from {args.init_from or 'SFT'}"
    if args.layers:
        shape = AutoConfig.from_pretrained(args.sft).to_dict()
        keep = (
            "model_type",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "tie_word_embeddings",
        )
        wider = {"hidden_size": args.width, "intermediate_size": 3 * args.width} if args.width else {}
        model = ModelSpec(
            architecture={k: shape[k] for k in keep} | {"num_hidden_layers": args.layers} | wider, tokenizer=args.sft
        )
        origin = f"{args.layers} layers of width {model.architecture['hidden_size']} from scratch"
    scores_of = summed_scores if args.pooling == "sum" else reward_scores
    if args.pooling == "sum":  # experiment only: the stage reads rewards this way in this process
        reward_stage.reward_scores = summed_scores
    module = RewardModule(
        model, optimizer=OptimizerSpec(learning_rate=args.lr, weight_decay=0.01, warmup_steps=20, schedule="cosine")
    )
    groups = sft_groups if grouped else [[pair] for pair in train]
    loader = DataLoader(
        groups,
        batch_size=args.batch_size // max(map(len, groups)),
        shuffle=True,
        collate_fn=partial(collate_pair_groups, pad_token_id=tokenizer.pad_token_id),
    )
    L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, loader)
    report(
        evaluate(model_margins(module.reward_model, tokenizer.pad_token_id, val, scores_of), val, kinds),
        ceiling,
        f"{args.sft_pairs} SFT ({args.responses_per_prompt} per prompt, temperatures {args.temperatures}, "
        f"batches of {args.batch_size}) + {args.drift_pairs} {args.drift_policy} "
        f"+ {args.edited_pairs} {'balanced ' if args.balanced_edits else ''}edited pairs "
        f"({sum(train_flawed) / max(1, len(train_flawed)):.1%} with a flawed response), {args.epochs} epochs, "
        f"lr {args.lr}, seed {args.seed}, {origin}, pooling {args.pooling}; sampling {sampled:.0f} s, all {time.perf_counter() - start:.0f} s",
    )


def report_uncertainty(model: torch.nn.Module, pairs: list[Pair], tokenizer) -> None:
    """Would a first reward model's uncertainty pick the flawed pairs for labelling? Shares of
    flawed pairs and of gold ties among the pairs with the smallest and the largest |margin|."""
    kinds = flaw_kinds(pairs, tokenizer)
    margins = model_margins(model, tokenizer.pad_token_id, pairs)
    order = sorted(range(len(pairs)), key=lambda i: abs(margins[i]))
    for side, share in (("least", 0.1), ("least", 0.25), ("least", 1.0), ("most", 0.25), ("most", 0.1)):
        n = int(share * len(order))
        chosen = order[:n] if side == "least" else order[-n:]
        flawed = sum(kinds[i] != "clean" for i in chosen) / n
        ties = sum(pairs[i].preference == 0.5 for i in chosen) / n  # equal gold: a coin-flip label
        which = "all pairs" if share == 1 else f"the {share:.0%} of pairs the model is {side} sure of"
        print(f"{which}: {flawed:.1%} flawed, {ties:.1%} gold ties")


def report(result: dict, ceiling: float, what: str) -> None:
    print(f"reward model: {what}")
    print(
        f"held-out ({result['all'][0]} SFT pairs): acc {result['acc']:.1%}  E[acc] {result['all'][1]:.1%}  "
        f"ceiling {ceiling:.1%}  gap {(ceiling - result['all'][1]) * 100:.1f} points"
    )
    for kind in (k for k in result if k not in ("acc", "all")):
        n, expected, best = result[kind]
        print(
            f"  {kind:>11} pairs: {n:4d}  E[acc] {expected:.1%}  ceiling {best:.1%}  "
            f"points lost overall {(best - expected) * n / result['all'][0] * 100:.1f}"
        )


if __name__ == "__main__":
    main()
