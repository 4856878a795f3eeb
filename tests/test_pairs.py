"""lit_p3o.tasks.pairs: the embedded task's labelled preference pairs and groups, sampled from a policy,
and the data module and reward stage that use them."""

from __future__ import annotations

import dataclasses
import math

import lightning as L
import pytest
import torch
from helpers import shuffled_tokenizer, spec

from lit_p3o.data.encoding import Encoded
from lit_p3o.data.preferences import PreferenceDataModule, collate_pairs
from lit_p3o.models import ModelSpec, load_tokenizer
from lit_p3o.optim import OptimizerSpec
from lit_p3o.scoring import reward_scores
from lit_p3o.stages.reward import RewardModule
from lit_p3o.tasks import get_task
from lit_p3o.tasks.pairs import EmbeddedPreferenceSpec, sample_labelled_groups, sample_labelled_pairs

TASK = get_task("reviews")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(spec())


# --------------------------------------------------------------------------- embedded preference pairs


def gold_of(tokenizer, prompt_ids, response: Encoded) -> float:
    ended = bool(response.response_ids) and response.response_ids[-1] == tokenizer.eos_token_id
    text = tokenizer.decode(response.response_ids, skip_special_tokens=True)
    return TASK.gold_reward(tokenizer.decode(prompt_ids, skip_special_tokens=True), text, ended)


def test_sample_labelled_pairs_from_a_saved_policy(micro_model_dir, tok):
    policy = str(micro_model_dir)
    spec_ = EmbeddedPreferenceSpec(policy=policy, label_temperature=0.5, max_new_tokens=4, generation_batch_size=4)
    pairs, ceiling = sample_labelled_pairs(TASK, spec_, "train", 6, seed=0, expected_vocab=tok.get_vocab())
    assert len(pairs) == 6
    prompts = TASK.prompts("train", 6)
    for (chosen, rejected), prompt in zip(pairs, prompts):
        assert chosen.response_ids != rejected.response_ids
        assert chosen.prompt_ids == rejected.prompt_ids == tok(prompt)["input_ids"]
        assert 1 <= len(chosen.response_ids) <= 4
    assert 0.5 <= ceiling <= 1.0
    # each pair carries P(chosen wins) = σ((gold_chosen − gold_rejected) / T), the draw's own probability
    preference = [
        1 / (1 + math.exp(-(gold_of(tok, c.prompt_ids, c) - gold_of(tok, r.prompt_ids, r)) / 0.5)) for c, r in pairs
    ]
    assert [p.preference for p in pairs] == pytest.approx(preference, abs=1e-9)
    assert ceiling == pytest.approx(sum(max(p, 1 - p) for p in preference) / 6, abs=1e-9)
    again, again_ceiling = sample_labelled_pairs(TASK, spec_, "train", 6, seed=0)
    assert again == pairs and again_ceiling == ceiling  # seeded


def test_k_wise_groups_label_every_pair_of_distinct_responses(micro_model_dir, tok):
    """K = 3 responses per prompt: each group holds the pairs among its distinct responses,
    all on one prompt, each with P(chosen wins) = σ(Δgold / T); the last group is cut so that
    exactly ``n_pairs`` come out, and K = 2 gives sample_labelled_pairs' pairs."""
    spec_ = EmbeddedPreferenceSpec(policy=str(micro_model_dir), label_temperature=0.5, max_new_tokens=4)
    groups, ceiling = sample_labelled_groups(TASK, spec_, "train", 8, seed=0, responses_per_prompt=3)
    assert sum(map(len, groups)) == 8 and all(1 <= len(g) <= 3 for g in groups)
    prompts = TASK.prompts("train", len(groups))
    preference = []
    for group, prompt in zip(groups, prompts):
        responses = {tuple(e.response_ids) for pair in group for e in pair}
        assert all(c.prompt_ids == r.prompt_ids == tok(prompt)["input_ids"] for c, r in group)
        assert all(c.response_ids != r.response_ids for c, r in group)
        unordered = {frozenset((tuple(c.response_ids), tuple(r.response_ids))) for c, r in group}
        assert len(unordered) == len(group)  # no pair twice
        if group is not groups[-1]:
            assert len(group) == math.comb(len(responses), 2)  # every pair of its distinct responses
        preference += [
            1 / (1 + math.exp(-(gold_of(tok, c.prompt_ids, c) - gold_of(tok, r.prompt_ids, r)) / 0.5)) for c, r in group
        ]
    assert [p.preference for g in groups for p in g] == pytest.approx(preference, abs=1e-9)
    assert ceiling == pytest.approx(sum(max(p, 1 - p) for p in preference) / 8, abs=1e-9)
    pairs, pair_ceiling = sample_labelled_pairs(TASK, spec_, "train", 6, seed=0)
    two, two_ceiling = sample_labelled_groups(TASK, spec_, "train", 6, seed=0, responses_per_prompt=2)
    assert [p for g in two for p in g] == pairs and two_ceiling == pair_ceiling
    with pytest.raises(ValueError, match="responses_per_prompt: must be >= 2, got 1"):
        sample_labelled_groups(TASK, spec_, "train", 6, seed=0, responses_per_prompt=1)


def test_k_wise_groups_drop_identical_responses(micro_model_dir, monkeypatch):
    """Four samples [x, x, y, z] of one prompt: x once, three pairs (x, y), (x, z), (y, z)."""
    from lit_p3o.generation import Sampled

    def fake_sample(policy, tokenizer, ids, sampling, batch_size=None, progress=None):
        texts = ["it is great .", "it is great .", "it is awful .", "it is okay ."]
        return Sampled(
            [Encoded(p, tokenizer(texts[i % 4])["input_ids"] + [1]) for i, p in enumerate(ids)], [True] * len(ids)
        )

    monkeypatch.setattr("lit_p3o.tasks.pairs.sample_responses", fake_sample)
    spec_ = EmbeddedPreferenceSpec(policy=str(micro_model_dir), label_temperature=1e-4)
    groups, ceiling = sample_labelled_groups(TASK, spec_, "train", 6, seed=0, responses_per_prompt=4)
    assert [len(g) for g in groups] == [3, 3]  # topped up from a second prompt
    decoded = [
        {TASK.build_tokenizer().decode(e.response_ids, skip_special_tokens=True) for e in pair} for pair in groups[0]
    ]
    assert decoded == [
        {"it is great .", "it is awful ."},
        {"it is great .", "it is okay ."},
        {"it is awful .", "it is okay ."},
    ]
    assert ceiling == 1.0  # distinct gold everywhere, T → 0


def test_k_wise_batches_hold_whole_groups(micro_model_dir, tok):
    spec_ = EmbeddedPreferenceSpec(
        policy=str(micro_model_dir), train_pairs=12, val_pairs=2, max_new_tokens=4, responses_per_prompt=3
    )
    data = PreferenceDataModule(train="embedded:reviews", embedded=spec_, tokenizer=tok, batch_size=6)
    data.setup("fit")
    assert len(data.train_pairs) == 12 and sum(map(len, data.train_groups)) == 12
    for batch in data.train_dataloader():  # two groups of three pairs per batch, each response once
        assert batch.chosen_rows.shape[0] == 6
        rows = {tuple(row) for row in batch.input_ids.tolist()}
        assert len(rows) == batch.input_ids.shape[0] <= 2 * 3
    assert next(iter(data.val_dataloader())).input_ids.shape[0] == 4  # held-out pairs stay one per prompt
    with pytest.raises(ValueError, match="batch_size: 4 is not a multiple of the 3 pairs per prompt"):
        PreferenceDataModule(train="embedded:reviews", embedded=spec_, tokenizer=tok, batch_size=4).setup("fit")
    # K = 4 makes 6 pairs per prompt: a batch of 4 pairs (a multiple of K) would split a group
    four = dataclasses.replace(spec_, responses_per_prompt=4)
    with pytest.raises(ValueError, match="batch_size: 4 is not a multiple of the 6 pairs per prompt"):
        PreferenceDataModule(train="embedded:reviews", embedded=four, tokenizer=tok, batch_size=4).setup("fit")


def test_tiny_label_temperature_labels_by_gold(micro_model_dir, tok):
    """T → 0: the labeller always prefers the higher gold reward; the Bayes accuracy is 1 on
    pairs with distinct gold and 1/2 on ties (no overflow for huge |Δgold| / T)."""
    spec_ = EmbeddedPreferenceSpec(policy=str(micro_model_dir), label_temperature=1e-4, max_new_tokens=4)
    pairs, ceiling = sample_labelled_pairs(TASK, spec_, "test", 8, seed=3)
    golds = [(gold_of(tok, c.prompt_ids, c), gold_of(tok, r.prompt_ids, r)) for c, r in pairs]
    assert all(gc >= gr for gc, gr in golds)
    distinct = sum(gc != gr for gc, gr in golds)
    assert ceiling == pytest.approx((distinct + 0.5 * (len(pairs) - distinct)) / len(pairs), abs=1e-6)


def test_labels_and_ceiling_with_controlled_responses(micro_model_dir, tok, monkeypatch):
    """Responses of known gold reward instead of the micro policy's noise: every pair has
    distinct gold, so with T = 1e-4 the chosen side is always the better one and the ceiling
    is 1; with a huge T the labels are coin flips and the ceiling is 1/2."""
    from lit_p3o.generation import Sampled

    good, bad = "it is great .", "it is awful . it is awful ."
    calls = []

    def fake_sample(policy, tokenizer, ids, sampling, batch_size=None, progress=None):
        size = batch_size or len(ids)  # the chunks sample_responses would generate
        calls.extend(min(size, len(ids) - start) for start in range(0, len(ids), size))
        # pairs alternate (good, bad) and (bad, good): Δgold / T is hugely positive, then negative
        texts = [(good, bad, bad, good)[i % 4] for i in range(len(ids))]
        return Sampled([Encoded(p, tokenizer(t)["input_ids"] + [1]) for p, t in zip(ids, texts)], [True] * len(ids))

    monkeypatch.setattr("lit_p3o.tasks.pairs.sample_responses", fake_sample)
    sharp = EmbeddedPreferenceSpec(policy=str(micro_model_dir), label_temperature=1e-4, generation_batch_size=4)
    pairs, ceiling = sample_labelled_pairs(TASK, sharp, "train", 5, seed=0)
    assert calls == [4, 4, 2]  # 10 responses in batches of generation_batch_size
    assert ceiling == 1.0
    assert [tok.decode(c.response_ids, skip_special_tokens=True) for c, _ in pairs] == [good] * 5
    flat = EmbeddedPreferenceSpec(policy=str(micro_model_dir), label_temperature=1e9)
    pairs, ceiling = sample_labelled_pairs(TASK, flat, "train", 40, seed=0)
    assert ceiling == pytest.approx(0.5, abs=1e-6)
    chosen_good = sum(tok.decode(c.response_ids, skip_special_tokens=True) == good for c, _ in pairs)
    assert 8 <= chosen_good <= 32  # coin flips, not always the better one


def test_sampling_temperatures_alternate_over_pairs(micro_model_dir, monkeypatch):
    """Pair i is sampled at sampling_temperatures[i % len], both responses at once, and the
    pairs keep the order of their prompts."""
    from lit_p3o.generation import Sampled

    seen = []

    def fake_sample(policy, tokenizer, ids, sampling, batch_size=None, progress=None):
        seen.append((sampling.temperature, len(ids)))
        word = {1.0: "it is great .", 2.0: "it is awful ."}[sampling.temperature]
        out = [Encoded(p, tokenizer(f"{word} " * (1 + k % 2))["input_ids"] + [1]) for k, p in enumerate(ids)]
        return Sampled(out, [True] * len(ids))

    monkeypatch.setattr("lit_p3o.tasks.pairs.sample_responses", fake_sample)
    spec_ = EmbeddedPreferenceSpec(policy=str(micro_model_dir), sampling_temperatures=[1.0, 2.0])
    pairs, _ = sample_labelled_pairs(TASK, spec_, "train", 5, seed=0)
    assert seen == [(1.0, 6), (2.0, 4)]  # pairs 0, 2, 4 at T=1 and pairs 1, 3 at T=2
    words = [{"great", "awful"} & set(TASK.build_tokenizer().decode(c.response_ids).split()) for c, _ in pairs]
    assert words == [{"great"}, {"awful"}, {"great"}, {"awful"}, {"great"}]
    with pytest.raises(ValueError, match="sampling_temperatures"):
        EmbeddedPreferenceSpec(sampling_temperatures=[1.0, 0.0])


def test_identical_samples_are_dropped_and_a_degenerate_policy_fails(micro_model_dir, monkeypatch):
    from lit_p3o.generation import Sampled

    monkeypatch.setattr(
        "lit_p3o.tasks.pairs.sample_responses",
        lambda policy, tokenizer, ids, sampling, batch_size=None, progress=None: Sampled(
            [Encoded(p, [5, 1]) for p in ids], [True] * len(ids)
        ),
    )
    spec_ = EmbeddedPreferenceSpec(policy=str(micro_model_dir))
    with pytest.raises(RuntimeError, match="every sampled pair was identical"):
        sample_labelled_pairs(TASK, spec_, "train", 3, seed=0)


def test_policy_with_another_tokenizer_is_refused(micro_model_dir):
    spec_ = EmbeddedPreferenceSpec(policy=str(micro_model_dir))
    with pytest.raises(ValueError, match="uses another tokenizer than the reward model"):
        sample_labelled_pairs(TASK, spec_, "train", 2, seed=0, expected_vocab=shuffled_tokenizer().get_vocab())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"label_temperature": 0.0}, "label_temperature: must be > 0, got 0.0"),
        ({"label_temperature": -1.0}, "label_temperature: must be > 0"),
        ({"train_pairs": 0}, "train_pairs and val_pairs must be >= 1"),
        ({"val_pairs": 0}, "train_pairs and val_pairs must be >= 1"),
        ({"responses_per_prompt": 1}, "responses_per_prompt: must be >= 2, got 1"),
    ],
)
def test_invalid_embedded_preference_spec(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EmbeddedPreferenceSpec(**kwargs)


def test_embedded_datamodule_reports_the_ceiling(micro_model_dir, tok, capsys):
    spec_ = EmbeddedPreferenceSpec(policy=str(micro_model_dir), train_pairs=3, val_pairs=2, max_new_tokens=3)
    data = PreferenceDataModule(train="embedded:reviews", embedded=spec_, tokenizer=tok, batch_size=2)
    data.setup("fit")
    assert (len(data.train_pairs), len(data.val_pairs)) == (3, 2)
    assert 0.5 <= data.label_accuracy_ceiling <= 1.0
    assert "embedded preferences: 3 train / 2 val pairs, labels at T=0.5" in capsys.readouterr().out
    batch = next(iter(data.val_dataloader()))
    assert batch.input_ids.shape[0] == 4


@pytest.mark.parametrize("bar", [True, False])
def test_embedded_pair_sampling_shows_progress_where_the_trainer_draws_bars(micro_model_dir, tok, capsys, bar):
    """The reward stage's minutes of pair sampling get a bar like the rollout's, and none when
    the trainer's progress bar is off."""
    spec_ = EmbeddedPreferenceSpec(policy=str(micro_model_dir), train_pairs=2, val_pairs=1, max_new_tokens=2)
    data = PreferenceDataModule(train="embedded:reviews", embedded=spec_, tokenizer=tok, batch_size=2)
    data.trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=bar)
    data.setup("fit")
    err = capsys.readouterr().err
    assert ("reward pairs: train" in err and "reward pairs: val" in err) == bar


def test_fit_on_embedded_pairs_prints_the_expected_accuracy(micro_model_dir, tok, capsys):
    """The stage's ``val/expected_accuracy`` is the mean over held-out pairs of P(the model's
    side wins), recomputed here from the trained model's margins and the pairs' probabilities."""
    torch.manual_seed(0)
    module = RewardModule(ModelSpec(name_or_path=str(micro_model_dir)), optimizer=OptimizerSpec(learning_rate=1e-2))
    spec_ = EmbeddedPreferenceSpec(policy=str(micro_model_dir), train_pairs=4, val_pairs=6, max_new_tokens=4)
    data = PreferenceDataModule(train="embedded:reviews", embedded=spec_, batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, data)
    batch = collate_pairs(data.val_pairs, tok.pad_token_id)
    with torch.no_grad():
        chosen, rejected = reward_scores(module.reward_model.eval(), batch).chunk(2)
    by_hand = (
        sum(p.preference if m > 0 else 1 - p.preference for p, m in zip(data.val_pairs, (chosen - rejected).tolist()))
        / 6
    )
    expected = trainer.callback_metrics["val/expected_accuracy"].item()
    assert expected == pytest.approx(by_hand, abs=1e-6)
    out = capsys.readouterr().out
    assert f"(expected over the label draw: {expected:.1%}; Bayes-optimal for these noisy labels: " in out
