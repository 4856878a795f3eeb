"""lit_p3o.scoring: reward_scores where transformers reads them, re-encoding for another tokenizer,
RewardScorer's checks and GoldScorer."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import PAIRS, encode, score_alone, shuffled_tokenizer, spec
from micro import MICRO_ARCH

from lit_p3o.data.encoding import Encoded, collate
from lit_p3o.models import LoraSpec, ModelSpec, build_reward_model, load_tokenizer
from lit_p3o.scoring import GoldScorer, RewardScorer, build_scorer, reward_scores
from lit_p3o.tasks import get_task

TASK = get_task("reviews")


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


# --------------------------------------------------------------------------- other tokenizers, gold reward


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
