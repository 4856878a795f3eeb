"""RewardModule: the Bradley–Terry step and its metrics, and fit → save → RewardScorer round trip."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import PAIRS, score_alone, shuffled_tokenizer, spec
from transformers import AutoModelForSequenceClassification

from lit_p3o.data.encoding import collate, encode_example
from lit_p3o.data.preferences import Pair, PreferenceDataModule, collate_pairs
from lit_p3o.losses import bradley_terry_loss
from lit_p3o.models import LoraSpec, ModelSpec, load_tokenizer
from lit_p3o.optim import OptimizerSpec
from lit_p3o.scoring import RewardScorer, build_scorer, reward_scores
from lit_p3o.stages.reward import RewardModule

TRL = Path(__file__).parent / "fixtures" / "prefs" / "trl.jsonl"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(spec())


# --------------------------------------------------------------------------- RewardModule step


class Logged(dict):
    def __call__(self, name, value, **kwargs):
        self[name] = value


@pytest.fixture
def module(monkeypatch):
    torch.manual_seed(0)
    module = RewardModule(spec())
    logged = Logged()
    monkeypatch.setattr(module, "log", logged)  # no Trainer: record what would be logged
    module.logged = logged
    return module


def pair_batch(tokenizer, pairs=PAIRS[:2]):
    encoded = [(encode_example(tokenizer, p, c, 64), encode_example(tokenizer, p, r, 64)) for p, c, r in pairs]
    return encoded, collate_pairs(encoded, tokenizer.pad_token_id)


def test_training_step_is_bradley_terry_on_the_scores(module):
    encoded, batch = pair_batch(module.tokenizer)
    assert torch.equal(
        batch.input_ids[0, batch.prompt_width :][: len(encoded[0][0].response_ids)],
        torch.tensor(encoded[0][0].response_ids),
    )  # row 0: first pair's chosen
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        chosen = torch.tensor([score_alone(module.reward_model, c) for c, _ in encoded])
        rejected = torch.tensor([score_alone(module.reward_model, r) for _, r in encoded])
    by_hand = sum(math.log1p(math.exp(-(c - r))) for c, r in zip(chosen.tolist(), rejected.tolist())) / 2
    torch.testing.assert_close(loss.item(), by_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, bradley_terry_loss(chosen, rejected), atol=1e-5, rtol=1e-5)
    assert loss.requires_grad
    loss.backward()
    assert module.reward_model.score.weight.grad is not None
    assert module.logged["train/loss"] is loss
    margin = (chosen - rejected).mean().item()
    torch.testing.assert_close(module.metrics["train_margin"].compute().item(), margin, atol=1e-5, rtol=1e-5)


def test_center_coef_adds_the_centering_term(monkeypatch):
    torch.manual_seed(0)
    module = RewardModule(spec(), center_coef=0.5)
    monkeypatch.setattr(module, "log", Logged())
    scores = torch.tensor([1.0, 2.0, 0.0, -1.0])
    monkeypatch.setattr("lit_p3o.stages.reward.reward_scores", lambda model, batch: scores)
    loss = module.training_step(pair_batch(module.tokenizer)[1], 0)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-3.0))) / 2 + 0.5 * (1.0 + 1.0) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="center_coef"):
        RewardModule(spec(), center_coef=-1.0)


def test_accuracy_and_margin_metrics(module, monkeypatch):
    """Scores chosen [3, 0], rejected [1, 0.5]: margins [2, -0.5]; then a tie, which is not a win."""
    calls = iter([torch.tensor([3.0, 0.0, 1.0, 0.5]), torch.tensor([1.0, 1.0, 1.0, 2.0])])
    monkeypatch.setattr("lit_p3o.stages.reward.reward_scores", lambda model, batch: next(calls))
    batch = pair_batch(module.tokenizer)[1]
    loss = module.training_step(batch, 0)
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(0.5))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert module.metrics["train_accuracy"].compute().item() == 0.5
    assert module.metrics["train_margin"].compute().item() == pytest.approx(0.75)
    assert set(module.logged) == {"train/loss", "train/accuracy", "train/margin"}
    module.validation_step(batch, 0)  # margins [0, -1]: no wins
    assert module.metrics["val_accuracy"].compute().item() == 0.0
    assert module.metrics["val_margin"].compute().item() == pytest.approx(-0.5)
    assert module.metrics["train_accuracy"].compute().item() == 0.5  # splits keep separate metrics


def test_expected_accuracy_weighs_each_ranking_by_the_labellers_probability(module, monkeypatch):
    """Margins [2, -0.5] with P(chosen wins) = [0.9, 0.3]: the first pair is ranked as its label
    (right with probability 0.9), the second against it (right with 1 − 0.3); then a tie, which
    like accuracy counts as preferring the rejected response."""
    calls = iter([torch.tensor([3.0, 0.0, 1.0, 0.5]), torch.tensor([1.0, 1.0, 1.0, 2.0])])
    monkeypatch.setattr("lit_p3o.stages.reward.reward_scores", lambda model, batch: next(calls))
    encoded = [Pair(c, r, preference=p) for (c, r), p in zip(pair_batch(module.tokenizer)[0], (0.9, 0.3))]
    batch = collate_pairs(encoded, module.tokenizer.pad_token_id)
    torch.testing.assert_close(batch.preference, torch.tensor([0.9, 0.3]))
    module.training_step(batch, 0)
    assert module.metrics["train_expected_accuracy"].compute().item() == pytest.approx((0.9 + 0.7) / 2)
    assert "train/expected_accuracy" in module.logged
    module.validation_step(batch, 0)  # margins [0, -1]
    assert module.metrics["val_expected_accuracy"].compute().item() == pytest.approx((0.1 + 0.7) / 2)


def test_pairs_keep_margin_and_preference_through_pickling_and_collate(tok):
    import pickle

    (c, r), (c2, r2) = pair_batch(tok)[0]
    known = pickle.loads(pickle.dumps(Pair(c, r, margin=0.5, preference=0.8)))
    assert (known.margin, known.preference) == (0.5, 0.8) and tuple(known) == (c, r)
    batch = collate_pairs([known, Pair(c2, r2, preference=0.25)], tok.pad_token_id)
    torch.testing.assert_close(batch.preference, torch.tensor([0.8, 0.25]))
    torch.testing.assert_close(batch.to("cpu").preference, batch.preference)
    assert collate_pairs([known, Pair(c2, r2)], tok.pad_token_id).preference is None  # one unknown: none
    assert collate_pairs([(c, r)], tok.pad_token_id).preference is None


def test_a_response_in_several_pairs_is_scored_once_with_the_same_loss_and_gradient(tok):
    """K-wise comparisons: pairs (a, b), (a, c), (c, b) of one prompt make three rows, not six;
    the loss and its gradient equal those of scoring every pair's rows separately."""
    prompt, texts = PAIRS[0][0], ("it is great .", "it is awful .", "i would recommend it .")
    a, b, c = (encode_example(tok, prompt, t, 64) for t in texts)
    pairs = [Pair(a, b, preference=0.9), Pair(a, c), Pair(c, b)]
    batch = collate_pairs(pairs, tok.pad_token_id)
    assert batch.input_ids.shape[0] == 3  # rows a, c, b: chosen sides first, each once
    assert (batch.chosen_rows.tolist(), batch.rejected_rows.tolist()) == ([0, 0, 1], [2, 1, 2])
    assert batch.preference is None and batch.margin.tolist() == [0.0, 0.0, 0.0]

    torch.manual_seed(0)
    module = RewardModule(spec())
    module.log = Logged()
    loss = module.training_step(batch, 0)
    (grad,) = torch.autograd.grad(loss, [module.reward_model.score.weight])
    separate = collate([x for x, _ in pairs] + [y for _, y in pairs], tok.pad_token_id)  # six rows
    chosen, rejected = reward_scores(module.reward_model, separate).chunk(2)
    by_rows = bradley_terry_loss(chosen, rejected)
    (grad_by_rows,) = torch.autograd.grad(by_rows, [module.reward_model.score.weight])
    torch.testing.assert_close(loss, by_rows, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, grad_by_rows, atol=1e-6, rtol=1e-5)
    distinct = collate_pairs(pair_batch(tok)[0], tok.pad_token_id)  # no shared response: chosen rows, then rejected
    assert (distinct.chosen_rows.tolist(), distinct.rejected_rows.tolist()) == ([0, 1], [2, 3])


# --------------------------------------------------------------------------- fit → save → score


def test_fit_save_and_score_round_trip(tmp_path, capsys):
    torch.manual_seed(0)
    save_dir = tmp_path / "reward"
    module = RewardModule(spec(), optimizer=OptimizerSpec(learning_rate=1e-2), save_dir=str(save_dir))
    before = module.reward_model.score.weight.detach().clone()
    data = PreferenceDataModule(train=str(TRL), val=str(TRL), max_length=64, batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,  # 5 pairs in batches of 2: one epoch, then validation
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, data)
    assert trainer.global_step == 3
    assert not torch.equal(module.reward_model.score.weight, before)
    assert {"train/loss", "val/loss", "val/accuracy", "val/margin"} <= set(trainer.callback_metrics)
    out = capsys.readouterr().out
    assert "[lit-p3o] reward model held-out accuracy" in out and "label draw" not in out  # TRL pairs: no probabilities
    assert f"[lit-p3o] saved the reward model to {save_dir.resolve()}" in out
    assert (save_dir / "config.json").is_file() and (save_dir / "tokenizer_config.json").is_file()

    prompts = [p for p, _, _ in PAIRS for _ in range(2)]
    responses = [r for _, c, rj in PAIRS for r in (c, rj)]
    scorer = RewardScorer.from_pretrained(save_dir)
    loaded = scorer.score(prompts, responses)
    trained_model = module.reward_model.eval()
    trained_tok = module.tokenizer
    batch = collate([encode_example(trained_tok, p, r, 1024) for p, r in zip(prompts, responses)], 0)
    with torch.no_grad():
        trained = reward_scores(trained_model, batch)
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-5)
    assert loaded.shape == (6,) and loaded.device.type == "cpu"
    assert scorer.tokenizer.get_vocab() == trained_tok.get_vocab()
    assert not any(p.requires_grad for p in scorer.model.parameters())

    # plain transformers loads the directory and agrees on an unpadded row
    hf = AutoModelForSequenceClassification.from_pretrained(save_dir).eval()
    assert hf.config.num_labels == 1
    example = encode_example(trained_tok, prompts[0], responses[0], 1024)
    with torch.no_grad():
        logit = hf(input_ids=torch.tensor([example.prompt_ids + example.response_ids])).logits[0, 0]
    torch.testing.assert_close(logit, loaded[0], atol=1e-5, rtol=1e-5)

    # build_scorer: a saved directory is a RewardScorer; ids are used as they are for the same vocabulary
    same = build_scorer(str(save_dir), trained_tok)
    assert isinstance(same, RewardScorer) and same.source_tokenizer is None
    ids_scores = same.score_examples([encode_example(trained_tok, p, r, 1024) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(ids_scores, loaded, atol=1e-5, rtol=1e-5)
    other = shuffled_tokenizer()
    assert build_scorer(str(save_dir), other).source_tokenizer is other


def test_lora_reward_model_saves_adapters_and_scores_the_same(micro_model_dir, tmp_path):
    """LoRA on a saved SFT policy: the adapters (and the new head) are saved alone, and the
    scorer loads base + adapters into the same function the module trained."""
    torch.manual_seed(0)
    save_dir = tmp_path / "reward-lora"
    model_spec = ModelSpec(name_or_path=str(micro_model_dir), lora=LoraSpec(r=2, lora_dropout=0.0))
    module = RewardModule(model_spec, optimizer=OptimizerSpec(learning_rate=1e-2), save_dir=str(save_dir))
    data = PreferenceDataModule(train=str(TRL), val=str(TRL), max_length=64, batch_size=2)
    L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
    ).fit(module, data)
    assert (save_dir / "adapter_config.json").is_file()
    prompts, responses = ["rate the tea :", "rate the bike :"], ["it is good .", "i hate it ."]
    loaded = RewardScorer.from_pretrained(save_dir).score(prompts, responses)
    batch = collate([encode_example(module.tokenizer, p, r, 1024) for p, r in zip(prompts, responses)], 0)
    with torch.no_grad():
        trained = reward_scores(module.reward_model.eval(), batch)
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-5)
