"""The embedded reviews task: grammar, corpus, prompts, tokenizer, registry and the gold reward
whose gap to a naive reward is what the RL demo's reward hacking is about."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from transformers import AutoTokenizer

from lit_p3o.tasks import EMBEDDED_PREFIX, get_task, resolve_embedded
from lit_p3o.tasks.reviews import (
    ITEMS,
    NO_EOS_PENALTY,
    ReviewsTask,
    gold_reward,
    gold_reward_batch,
    is_grammatical,
    polarity_and_flaws,
    prompts,
    sft_corpus,
)

PROMPT = "write a review of the pizza :"
GOOD = "the pizza is very tasty . i would order it again ."
NEUTRAL = "i tried the pizza yesterday . it is okay ."
NEGATIVE = "the pizza is bland . i would not order it again ."


def reward(response: str, ended: bool = True, prompt: str = PROMPT) -> float:
    return gold_reward(prompt, response, ended)


def naive_proxy(response: str) -> int:
    """A careless reward model: the more positive words, the better."""
    positive = {"great", "good", "tasty", "delicious", "amazing", "excellent", "nice", "love", "like"}
    return sum(word in positive for word in response.split())


@pytest.fixture(scope="module")
def corpus() -> list[dict[str, str]]:
    return sft_corpus(2000, seed=0)


def test_gold_orders_positive_neutral_negative():
    assert reward(GOOD) > reward(NEUTRAL) > reward(NEGATIVE)
    assert reward(NEUTRAL) == 0.0
    assert reward("the pizza is great .") > reward("the pizza is good .") > 0


def test_gold_handles_negation_and_intensifiers():
    assert reward("the pizza is not good .") < 0 < reward("the pizza is not bad .")
    assert reward("the pizza is not bad .") < reward("the pizza is good .")
    assert reward("i do not like it .") < 0 < reward("i like it .")
    assert reward("the pizza is very good .") > reward("the pizza is good .")
    assert reward("the pizza is very bad .") < reward("the pizza is bad .")
    assert reward("i would not recommend it .") < 0 < reward("i would recommend it .")


def test_gold_cares_about_the_asked_item():
    assert reward("the burger is great .") < reward("the pizza is great .")
    assert reward("the burger is great .") < reward(NEUTRAL)
    # "it" refers to the item named last, so praising it after naming the burger is off-topic too
    assert reward("i tried the burger today . it is great .") == pytest.approx(-1.0)  # two off-topic
    assert reward("it is great .") == reward("the pizza is great .")  # "it" alone means the asked item


def test_missing_eos_costs_exactly_the_documented_penalty():
    for response in (GOOD, NEUTRAL, NEGATIVE, "great great", ""):
        assert reward(response, ended=False) == pytest.approx(reward(response) - NO_EOS_PENALTY)
    assert NO_EOS_PENALTY == 1.0


def test_repetition_and_ungrammatical_text_are_punished():
    once = reward("the pizza is great .")
    assert reward("the pizza is great . the pizza is great .") < once
    assert reward("the pizza is great . it is great .") < once  # same sentence, other phrasing
    assert reward("the pizza is great . the pizza is great . the pizza is great .") < 0
    assert reward("great great great great great") < 0
    assert reward("the pizza great is .") < reward(NEUTRAL)
    assert reward("the pizza is great") < 0  # never finished its sentence
    assert reward("the pizza is great . is great the") < once
    assert reward("") < 0


def test_polarity_and_flaws_are_the_formulas_s_and_u_plus_d_plus_o_by_kind():
    def flaws_of(response: str) -> tuple[float, dict[str, int]]:
        s, flaws = polarity_and_flaws(PROMPT, response)
        return s, {kind: n for kind, n in flaws.items() if n}

    assert flaws_of("the pizza is great . i love it .") == (2.0 + 2.0, {})
    assert flaws_of("the pizza is great . it is great .") == (2.0, {"repeated": 1})
    assert flaws_of("the burger is great . the pizza is good .") == (1.0, {"off-topic": 1})
    assert flaws_of("the burger is great . it is great .") == (0.0, {"off-topic": 2})  # "it" is the burger
    assert flaws_of("the pizza great is . the pizza is great") == (0.0, {"unparseable": 2})  # and a tail
    assert flaws_of("") == (0.0, {"unparseable": 1})
    for response in (GOOD, NEUTRAL, "great great", "the burger is great . it is great ."):
        s, flaws = polarity_and_flaws(PROMPT, response)
        assert reward(response) == pytest.approx(math.tanh(s / 2) - min(2, 0.5 * flaws.total()))


def test_gold_reward_formula_and_range():
    assert reward("the pizza is great .") == pytest.approx(math.tanh(1.0))
    assert reward("the pizza is very good . i love it .") == pytest.approx(math.tanh((1.5 + 2) / 2))
    assert reward("the pizza is not bad .") == pytest.approx(math.tanh(0.25))
    assert reward("great great") == pytest.approx(-0.5)
    worst = reward(" ".join(["great ."] * 10), ended=False)
    assert worst == pytest.approx(-3.0) and worst > -4
    rng = random.Random(0)
    words = "the pizza burger it is not very good bad great i love hate would order again . . .".split()
    for _ in range(300):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 20)))
        assert -4 < reward(text, ended=rng.random() < 0.5) < 1


def test_naive_proxy_is_exploitable_but_gold_is_not():
    single = "the pizza is tasty . i would order it again ."
    assert is_grammatical(single)
    for degenerate in (
        "great great great great great",
        "the pizza is great . the pizza is great . the pizza is great .",
        "good good good great great love love",
    ):
        assert naive_proxy(degenerate) > naive_proxy(single)
        assert reward(degenerate) < reward(single)


def test_gold_reward_batch_matches_and_checks_lengths():
    responses = [GOOD, NEUTRAL, NEGATIVE]
    assert gold_reward_batch([PROMPT] * 3, responses, [True, False, True]) == [
        reward(GOOD),
        reward(NEUTRAL, ended=False),
        reward(NEGATIVE),
    ]
    with pytest.raises(ValueError, match="2 responses"):
        gold_reward_batch([PROMPT] * 3, responses[:2], [True] * 3)


def test_gold_reward_needs_a_task_prompt():
    with pytest.raises(ValueError, match="names no item"):
        gold_reward("tell me a joke :", GOOD, True)


def test_grammar_accepts_corpus_and_rejects_scrambles(corpus):
    assert all(is_grammatical(row["completion"]) for row in corpus)
    rng = random.Random(0)
    rejected = 0
    for row in corpus[:300]:
        words = row["completion"].split()
        scrambled = rng.sample(words, len(words))
        if scrambled != words:
            rejected += not is_grammatical(" ".join(scrambled))
    assert rejected >= 290
    for bad in ("", ".", "the pizza is great", "pizza the is great .", "the pizza is great . .", "great great ."):
        assert not is_grammatical(bad), bad
    assert is_grammatical("the pizza is not very sturdy . i do not really hate it . i bought it last week .")


def test_corpus_is_deterministic_and_mixed(corpus):
    assert sft_corpus(50, seed=0) == corpus[:50]
    assert sft_corpus(50, seed=1) != corpus[:50]
    scores = [gold_reward(row["prompt"], row["completion"], True) for row in corpus]
    assert abs(statistics.mean(scores)) < 0.15
    assert sum(s > 0.2 for s in scores) > 0.2 * len(scores)
    assert sum(s < -0.2 for s in scores) > 0.2 * len(scores)
    assert all(not row["completion"].endswith("<eos>") for row in corpus)


def test_corpus_fits_the_length_hints(corpus):
    task = ReviewsTask()
    assert max(len(row["completion"].split()) + 1 for row in corpus) <= task.max_response_tokens
    all_prompts = prompts("train", 2000) + prompts("test", 500)
    assert max(len(p.split()) for p in all_prompts) == task.max_prompt_tokens


def test_prompt_splits_are_disjoint_deterministic_and_cover_items(corpus):
    train, test = prompts("train", 10_000), prompts("test", 10_000)
    assert set(train).isdisjoint(test)
    assert len(set(test)) >= 200 and len(set(train)) >= 4 * len(set(test)) - 50
    assert prompts("test", 20) == test[:20] == prompts("test", 20)
    assert {row["prompt"] for row in corpus} <= set(train)  # SFT never sees a test prompt
    asked = {p.split(" the ")[1].split()[0] for p in train}
    assert asked == set(ITEMS)


def test_prompts_cycle_past_the_split_and_reject_unknown_splits():
    size = len(set(prompts("test", 10_000)))
    cycled = prompts("test", size + 5)
    assert cycled[size:] == cycled[:5]
    assert prompts("train", 0) == []
    with pytest.raises(ValueError, match="unknown prompt split"):
        prompts("validation", 3)
    with pytest.raises(ValueError, match=">= 0"):
        prompts("train", -1)


def test_tokenizer_special_ids_and_round_trip(tmp_path, corpus):
    tok = ReviewsTask().build_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token_id) == (0, 1, 2, 3)
    assert (tok.pad_token, tok.eos_token, tok.unk_token, tok.bos_token) == ("<pad>", "<eos>", "<unk>", "<bos>")
    assert 100 <= len(tok) <= 200
    assert tok.get_vocab() == ReviewsTask().build_tokenizer().get_vocab()
    ids = tok(GOOD)["input_ids"]
    assert len(ids) == len(GOOD.split())  # no BOS/EOS added
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == GOOD
    assert tok("zebra")["input_ids"] == [tok.unk_token_id]

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [GOOD, PROMPT, *(row["completion"] for row in corpus[:50])]
    assert [loaded(t)["input_ids"] for t in texts] == [tok(t)["input_ids"] for t in texts]
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id, loaded.bos_token_id) == (0, 1, 2, 3)
    assert loaded.decode(ids, skip_special_tokens=True) == GOOD


def test_every_task_word_is_in_vocabulary(corpus):
    tok = ReviewsTask().build_tokenizer()
    texts = [r["prompt"] for r in corpus] + [r["completion"] for r in corpus] + prompts("test", 300)
    for text in texts:
        assert tok.unk_token_id not in tok(text)["input_ids"], text


def test_registry():
    task = get_task("reviews")
    assert isinstance(task, ReviewsTask) and task.name == "reviews"
    assert isinstance(resolve_embedded(EMBEDDED_PREFIX + "reviews"), ReviewsTask)
    assert resolve_embedded("gpt2") is None
    assert resolve_embedded("data/reviews.jsonl") is None
    with pytest.raises(ValueError, match="known tasks: arithmetic, reviews"):
        get_task("poems")
    with pytest.raises(ValueError, match="unknown embedded task 'poems'"):
        resolve_embedded("embedded:poems")
