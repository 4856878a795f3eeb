"""Reward modelling: reward_scores where transformers reads them, the Bradley–Terry step and its
metrics, fit → save → RewardScorer round trip, re-encoding for another tokenizer, GoldScorer,
build_scorer, and the embedded task's labelled preference pairs."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from micro import MICRO_ARCH
from tokenizers import Tokenizer, decoders
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

from lit_p3o.data.encoding import Encoded, collate, encode_example
from lit_p3o.data.preferences import (
    EmbeddedPreferenceSpec,
    Pair,
    PreferenceDataModule,
    collate_pairs,
    sample_labelled_groups,
    sample_labelled_pairs,
)
from lit_p3o.losses import bradley_terry_loss
from lit_p3o.models import LoraSpec, ModelSpec, build_reward_model, load_tokenizer
from lit_p3o.optim import OptimizerSpec
from lit_p3o.scoring import GoldScorer, RewardScorer, build_scorer, reward_scores
from lit_p3o.stages.reward import RewardModule
from lit_p3o.tasks import get_task
from lit_p3o.tasks.reviews import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, vocabulary

TRL = Path(__file__).parent / "fixtures" / "prefs" / "trl.jsonl"
TASK = get_task("reviews")

PAIRS = [  # (prompt, chosen, rejected), with prompts and responses of different lengths
    ("write a review of the pizza :", "the pizza is very tasty . i would order it again .", "the pizza is stale ."),
    ("rate the bike :", "i would recommend the bike .", "it is flimsy ."),
    ("what do you think of the lamp for my blog ?", "i really like it .", "i hate the lamp . it is noisy ."),
]


def spec(tokenizer: str = "embedded:reviews") -> ModelSpec:
    return ModelSpec(architecture=dict(MICRO_ARCH), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(spec())


@pytest.fixture(scope="module")
def reward_model(tok):
    torch.manual_seed(0)
    model = build_reward_model(spec(), tok)
    with torch.no_grad():  # a head that is not near zero, so that differences show
        model.score.weight.normal_(0, 1)
    return model.eval()


def encode(tokenizer, prompt, response, add_eos=True) -> Encoded:
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return Encoded(prompt_ids, response_ids + ([tokenizer.eos_token_id] if add_eos else []))


@torch.no_grad()
def score_alone(model, example: Encoded) -> float:
    """The reference: the backbone on the unpadded row alone, the head at its final position."""
    ids = torch.tensor([example.prompt_ids + example.response_ids])
    hidden = model.model(input_ids=ids).last_hidden_state
    return model.score(hidden[0, -1]).item()


def examples_of(tokenizer, pairs=PAIRS) -> list[Encoded]:
    return [encode(tokenizer, p, r) for p, c, rj in pairs for r in (c, rj)]


# --------------------------------------------------------------------------- reward_scores


def test_reward_scores_read_the_last_attended_token(reward_model, tok):
    examples = examples_of(tok)
    batch = collate(examples, tok.pad_token_id)
    assert batch.attention_mask.sum(1).min() < batch.attention_mask.shape[1]  # left and right padding present
    with torch.no_grad():
        scores = reward_scores(reward_model, batch)
    assert scores.shape == (6,) and scores.dtype == torch.float32
    expected = torch.tensor([score_alone(reward_model, e) for e in examples])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert expected.unique().numel() == 6  # distinct rows, so a wrong position would show


def test_reward_scores_do_not_depend_on_padding(reward_model, tok):
    short = encode(tok, "rate the tea :", "it is good .")
    long = encode(tok, "please write a review of the soup for my blog :", "the soup is bland . " * 4)
    with torch.no_grad():
        alone = reward_scores(reward_model, collate([short], tok.pad_token_id))
        padded = reward_scores(reward_model, collate([short, long], tok.pad_token_id))
        padded_more = reward_scores(reward_model, collate([long, short, long], tok.pad_token_id))
    assert collate([short, long], tok.pad_token_id).input_ids.shape[1] > len(short.prompt_ids + short.response_ids)
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded_more[1], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded_more[0], padded_more[2])
    torch.testing.assert_close(alone[0].item(), score_alone(reward_model, short), atol=1e-5, rtol=1e-5)


def test_reward_scores_when_pad_is_eos_follow_transformers():
    """With pad = EOS transformers reads the last token that is not the pad id, i.e. the token
    before a final EOS; reward_scores reads the same position, so both score alike."""
    tokenizer = TASK.build_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 1
    torch.manual_seed(1)
    model = build_reward_model(spec(), tokenizer).eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 1)
    assert model.config.pad_token_id == 1
    examples = examples_of(tokenizer, PAIRS[:2])
    batch = collate(examples, tokenizer.pad_token_id)
    assert (batch.input_ids[:, -1] == 1).all()  # every row ends with EOS or EOS padding
    with torch.no_grad():
        scores = reward_scores(model, batch)
        hf = [model(input_ids=torch.tensor([e.prompt_ids + e.response_ids])).logits[0, 0] for e in examples]
    before_eos = torch.tensor([score_alone(model, Encoded(e.prompt_ids, e.response_ids[:-1])) for e in examples])
    torch.testing.assert_close(scores, torch.stack(hf), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, before_eos, atol=1e-5, rtol=1e-5)
    at_eos = torch.tensor([score_alone(model, e) for e in examples])
    assert not torch.allclose(scores, at_eos, atol=1e-3)  # the position matters


def test_reward_scores_under_lora(tok):
    torch.manual_seed(2)
    lora_spec = ModelSpec(
        architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews", lora=LoraSpec(r=2, lora_dropout=0.0)
    )
    model = build_reward_model(lora_spec, tok).eval()
    with torch.no_grad():  # adapters and the saved head copy away from their initial values
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.normal_(0, 0.5)
    example = encode(tok, "rate the tea :", "it is good .")
    batch = collate([example, encode(tok, "review the lamp for my blog :", "i like it . it is useful .")], 0)
    with torch.no_grad():
        scores = reward_scores(model, batch)
        plain = model(input_ids=torch.tensor([example.prompt_ids + example.response_ids])).logits[0, 0]
        with model.disable_adapter():
            base = reward_scores(model, batch)
    torch.testing.assert_close(scores[0], plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scores, base, atol=1e-3)


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


# --------------------------------------------------------------------------- other tokenizers, gold reward


def shuffled_tokenizer() -> PreTrainedTokenizerFast:
    """The task's words with the vocabulary in reverse order and the special tokens last, so
    that no id (EOS included) means the same as in the task's tokenizer."""
    vocab = {token: i for i, token in enumerate((*reversed(vocabulary()), *SPECIAL_TOKENS))}
    backend = Tokenizer(WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        bos_token=BOS,
        clean_up_tokenization_spaces=False,
    )


def test_accept_ids_from_another_tokenizer_re_encodes(reward_model, tok):
    policy_tok = shuffled_tokenizer()
    assert policy_tok.eos_token_id != tok.eos_token_id
    assert policy_tok("the pizza")["input_ids"] != tok("the pizza")["input_ids"]
    scorer = RewardScorer(reward_model, tok)
    prompts = [p for p, _, _ in PAIRS for _ in range(2)]
    responses = [r for _, c, rj in PAIRS for r in (c, rj)]
    direct = scorer.score(prompts, responses)

    policy_examples = examples_of(policy_tok)
    as_is = scorer.score_examples(policy_examples)  # the policy's ids read with the wrong vocabulary
    scorer.accept_ids_from(policy_tok)
    assert scorer.source_tokenizer is policy_tok
    torch.testing.assert_close(scorer.score_examples(policy_examples, [True] * 6), direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scorer.score_examples(policy_examples), direct, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(as_is, direct, atol=1e-3)

    # a response that did not end: no EOS on either side
    unended = [encode(policy_tok, prompts[0], responses[0], add_eos=False)]
    reference = RewardScorer(reward_model, tok).score_examples([encode(tok, prompts[0], responses[0], add_eos=False)])
    torch.testing.assert_close(scorer.score_examples(unended, [False]), reference, atol=1e-5, rtol=1e-5)

    scorer.accept_ids_from(TASK.build_tokenizer())  # the same vocabulary again: ids as they are
    assert scorer.source_tokenizer is None


def test_score_checks_lengths_and_handles_nothing(reward_model, tok):
    scorer = RewardScorer(reward_model, tok, batch_size=2)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        scorer.score(["a", "b"], ["c"])
    assert scorer.score_examples([]).shape == (0,)
    # batching does not change scores
    prompts, responses = ["rate the tea :"] * 3, ["it is good .", "i hate it .", "the tea is okay . i had it today ."]
    torch.testing.assert_close(
        scorer.score(prompts, responses),
        RewardScorer(reward_model, tok, batch_size=8).score(prompts, responses),
        atol=1e-5,
        rtol=1e-5,
    )


def test_gold_scorer_is_the_task_gold_reward_on_decoded_text(tok):
    scorer = build_scorer("embedded:reviews", tok)
    assert isinstance(scorer, GoldScorer) and scorer.task.name == "reviews" and scorer.tokenizer is tok
    cases = [
        ("write a review of the pizza :", "the pizza is very tasty . i would order it again .", True),
        ("rate the bike :", "it is flimsy .", True),
        ("rate the bike :", "it is flimsy", False),
        ("what do you think of the lamp ?", "i love the pizza .", True),
    ]
    examples = [encode(tok, p, r, add_eos=e) for p, r, e in cases]
    scores = scorer.score_examples(examples, [e for _, _, e in cases])
    expected = [TASK.gold_reward(p, r, e) for p, r, e in cases]
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.tensor(expected))
    assert expected[0] == pytest.approx(math.tanh((1.5 + 1) / 2))
    assert expected[2] == pytest.approx(-0.5 - 1.0)  # an unfinished sentence, no EOS
    assert expected[3] == pytest.approx(-0.5)  # off-topic
    # without flags every response counts as ended
    torch.testing.assert_close(scorer.score_examples(examples[:2]), torch.tensor(expected[:2]))


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
