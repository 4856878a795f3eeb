"""A float32 reward model scores in float32 inside a bf16-mixed trainer's rollout and evaluation."""

import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from micro import MICRO_ARCH

from lit_p3o.data.encoding import collate, encode_example
from lit_p3o.models import ModelSpec, build_reward_model, load_tokenizer
from lit_p3o.scoring import RewardScorer, reward_scores

PAIRS = [
    ("write a review of the pizza :", "the pizza is very tasty . i would order it again ."),
    ("rate the bike :", "i would recommend the bike ."),
    ("what do you think of the lamp for my blog ?", "i hate the lamp . it is noisy ."),
]


def test_reward_model_scores_in_float32_under_bf16_mixed():
    spec = ModelSpec(architecture=dict(MICRO_ARCH), tokenizer="embedded:reviews")
    tokenizer = load_tokenizer(spec)
    torch.manual_seed(0)
    model = build_reward_model(spec, tokenizer).eval()
    with torch.no_grad():  # a head far from zero, so that rounding shows in the score
        model.score.weight.normal_(0, 1)
    scorer = RewardScorer(model, tokenizer)
    examples = [encode_example(tokenizer, p, r, 64) for p, r in PAIRS]
    float32 = scorer.score_examples(examples)
    # the context the rollout and evaluation run in (RolloutCallback: trainer.precision_plugin.forward_context())
    with MixedPrecision("bf16-mixed", "cpu").forward_context():
        under_bf16_mixed = scorer.score_examples(examples)
        with torch.no_grad():
            autocast = reward_scores(model, collate(examples, tokenizer.pad_token_id))
    assert under_bf16_mixed.dtype == torch.float32
    torch.testing.assert_close(under_bf16_mixed, float32, rtol=1e-6, atol=1e-6)
    assert (autocast - float32).abs().max() > 1e-3  # what the forward gives under autocast
