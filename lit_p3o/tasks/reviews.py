"""The embedded "reviews" task: a tiny synthetic language for running RLHF end to end on a CPU.

A prompt asks for a review of one item (``"write a review of the pizza :"``); a response is
1-3 short sentences, each ending with ``"."`` (``"the pizza is very tasty . i would order it
again ."``). Text is lowercase words and punctuation separated by single spaces, so a
word-level tokenizer covers it exactly and a ~1M-parameter transformer learns it in minutes.
Everything is deterministic: the same calls give the same corpus, prompts and rewards.

Grammar. A response is one or more sentences; a sentence is one of these templates followed
by ``"."``, where OBJ is ``it`` or ``the ITEM``::

    OBJ is [not] [very|really] ADJ                       the pizza is not very tasty
    i [do not] [really] love|like|dislike|hate OBJ       i really like it
    i would [not] order|buy OBJ again                    i would not buy the lamp again
    i would [not] recommend OBJ                          i would recommend it
    i tried|had|ordered|bought|used OBJ today|yesterday|last week     (neutral)

Gold reward (the "human" that ranks responses). ``it`` refers to the item named most recently,
or to the prompt's item before any is named. Each sentence gets a value ``v``: the polarity of
its adjective or verb (see ``POLARITY``: +-2 strong, +-1 mild, 0 neutral), times 1.5 with an
intensifier; then negation turns a positive value ``p`` into ``-p`` ("not good" is as bad as
"bad"), a negative one into ``-p/2`` ("not bad" is mildly positive) and a neutral one into
-0.5. The fact template is worth 0. Counting over the sentences of the response:

* ``U``: sentences that do not parse, plus one for words after the last ``"."`` (an
  unfinished sentence) or for an empty response,
* ``O``: parsed sentences about another item than the prompt's,
* ``D``: parsed sentences about the prompt's item that repeat an earlier one, where naming
  the item and saying ``it`` count as the same sentence,
* ``S``: the sum of ``v`` over the remaining (grammatical, on-topic, first-seen) sentences,

the reward is::

    R = tanh(S / 2) - min(2, 0.5 * (U + D + O)) - (0 if ended_with_eos else 1)

so ``R`` lies in the open interval (-4, 1). Repeating a sentence never adds sentiment and costs
0.5, which makes the reward robust to the degenerate texts ("great great great", the same
praise three times) that a reward model counting positive words would prefer: that gap is what
the RL stage's reward hacking runs into.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerFast

from lit_p3o.tasks.words import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, word_tokenizer  # noqa: F401  (re-exported)

FOODS = (
    "pizza",
    "soup",
    "coffee",
    "burger",
    "salad",
    "pasta",
    "cake",
    "tea",
    "bread",
    "sushi",
    "curry",
    "pie",
    "steak",
    "sandwich",
    "taco",
)
GOODS = (
    "phone",
    "laptop",
    "camera",
    "lamp",
    "chair",
    "jacket",
    "bike",
    "watch",
    "backpack",
    "kettle",
    "blender",
    "tent",
    "umbrella",
    "mug",
    "desk",
)
ITEMS = FOODS + GOODS

# Adjectives any item can take, and those the corpus only uses for one category (the grammar
# and the reward accept every adjective with every item).
GENERIC_ADJECTIVES = {
    "great": 2,
    "excellent": 2,
    "amazing": 2,
    "good": 1,
    "nice": 1,
    "lovely": 1,
    "okay": 0,
    "average": 0,
    "ordinary": 0,
    "bad": -1,
    "poor": -1,
    "disappointing": -1,
    "awful": -2,
    "terrible": -2,
    "horrible": -2,
}
FOOD_ADJECTIVES = {"delicious": 2, "tasty": 1, "fresh": 1, "bland": -1, "stale": -1, "disgusting": -2}
GOODS_ADJECTIVES = {"brilliant": 2, "sturdy": 1, "useful": 1, "flimsy": -1, "noisy": -1, "useless": -2}
ADJECTIVES = GENERIC_ADJECTIVES | FOOD_ADJECTIVES | GOODS_ADJECTIVES
FEELINGS = {"love": 2, "like": 1, "dislike": -1, "hate": -2}
VERDICTS = {"order": 1, "buy": 1, "recommend": 2}
POLARITY: dict[str, int] = ADJECTIVES | FEELINGS | VERDICTS
INTENSIFIERS = ("very", "really")
INTENSITY = 1.5
FOOD_FACT_VERBS, GOODS_FACT_VERBS = ("tried", "had", "ordered"), ("tried", "bought", "used")
FACT_VERBS = tuple(dict.fromkeys(FOOD_FACT_VERBS + GOODS_FACT_VERBS))
TIMES = ("today", "yesterday", "last week")

PROMPT_OPENERS = (
    "write a review of",
    "please write a review of",
    "review",
    "rate",
    "what do you think of",
    "how do you like",
)
PROMPT_MENTIONS = ("", "for my friend", "for my family", "for my blog", "for the website", "for our shop")
TEST_SHARE = 5  # one prompt in TEST_SHARE (by hash) is held out for evaluation

FLAW_PENALTY = 0.5  # per ungrammatical, off-topic or repeated sentence
MAX_PENALTY = 2.0
NO_EOS_PENALTY = 1.0

_INTENSIFIER = "|".join(f" {word}" for word in INTENSIFIERS)
_OBJ = rf"(?:it|the (?P<item>{'|'.join(ITEMS)}))"
_SENTENCES = tuple(
    re.compile(pattern)
    for pattern in (
        rf"{_OBJ} is(?P<neg> not)?(?P<int>{_INTENSIFIER})? (?P<word>{'|'.join(ADJECTIVES)})",
        rf"i(?P<neg> do not)?(?P<int> really)? (?P<word>{'|'.join(FEELINGS)}) {_OBJ}",
        rf"i would(?P<neg> not)? (?P<word>order|buy) {_OBJ} again",
        rf"i would(?P<neg> not)? (?P<word>recommend) {_OBJ}",
        rf"i (?:{'|'.join(FACT_VERBS)}) {_OBJ} (?:{'|'.join(TIMES)})",
    )
)


@dataclass(frozen=True)
class Sentence:
    """A parsed sentence: its value and the item it names (None for ``it``)."""

    value: float
    item: str | None


def parse_sentence(text: str) -> Sentence | None:
    """The sentence (without its ``"."``) under the grammar, or None when it does not parse."""
    for pattern in _SENTENCES:
        match = pattern.fullmatch(text)
        if match is None:
            continue
        groups = match.groupdict()
        value = POLARITY.get(groups.get("word") or "", 0) * (INTENSITY if groups.get("int") else 1.0)
        if groups.get("neg"):
            value = -value if value > 0 else (-value / 2 if value < 0 else -0.5)
        return Sentence(value, groups["item"])
    return None


def split_sentences(response: str) -> tuple[list[str], bool]:
    """The finished sentences of a response (without their ``"."``), and whether words follow
    the last ``"."`` (an unfinished sentence)."""
    sentences, current = [], []
    for token in response.split():
        if token == ".":
            sentences.append(" ".join(current))
            current = []
        else:
            current.append(token)
    return sentences, bool(current)


def is_grammatical(response: str) -> bool:
    """True when the response is non-empty and every sentence parses and ends with ``"."``."""
    sentences, unfinished = split_sentences(response)
    return bool(sentences) and not unfinished and all(parse_sentence(s) for s in sentences)


def prompt_item(prompt: str) -> str:
    """The item a prompt asks about: the first item word in it."""
    for token in prompt.split():
        if token in ITEMS:
            return token
    raise ValueError(f"reviews task: prompt {prompt!r} names no item of the task")


def _as_it(sentence: str, item: str) -> str:
    """The sentence with ``the ITEM`` said as ``it``, so both phrasings count as one sentence."""
    return sentence.replace(f"the {item}", "it")


def gold_reward(prompt: str, response: str, ended_with_eos: bool) -> float:
    """The task's "human" score of a response; the formula is in the module docstring."""
    total, flaws = polarity_and_flaws(prompt, response)
    penalty = min(MAX_PENALTY, FLAW_PENALTY * flaws.total())
    return math.tanh(total / 2) - penalty - (0.0 if ended_with_eos else NO_EOS_PENALTY)


def polarity_and_flaws(prompt: str, response: str) -> tuple[float, Counter[str]]:
    """``S`` of the gold reward, the summed polarity of the sentences about the requested item,
    and its flaws by kind: ``"unparseable"`` (U), ``"off-topic"`` (O) and ``"repeated"`` (D)
    sentences; ``flaws.total()`` is ``U + D + O``. Kinds help explain where a learned reward errs."""
    item = prompt_item(prompt)
    referent, seen = item, set()
    sentences, unfinished = split_sentences(response)
    total, flaws = 0.0, Counter({"unparseable": int(unfinished or not sentences)})  # a tail or an empty response
    for text in sentences:
        sentence = parse_sentence(text)
        if sentence is None:
            flaws["unparseable"] += 1
            continue
        referent = sentence.item or referent
        key = _as_it(text, referent)
        if referent != item or key in seen:
            flaws["off-topic" if referent != item else "repeated"] += 1
            continue
        seen.add(key)
        total += sentence.value
    return total, flaws


def gold_reward_batch(prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool]) -> list[float]:
    """:func:`gold_reward` over aligned lists."""
    if not len(prompts) == len(responses) == len(ended):
        raise ValueError(
            f"gold_reward_batch: {len(prompts)} prompts, {len(responses)} responses, {len(ended)} ended flags"
        )
    return [gold_reward(p, r, e) for p, r, e in zip(prompts, responses, ended)]


def _join(*words: str) -> str:
    return " ".join(word for word in words if word)


def _all_prompts() -> list[str]:
    out = []
    for opener in PROMPT_OPENERS:
        end = "?" if opener.startswith(("what", "how")) else ":"
        out += [_join(opener, "the", item, mention, end) for item in ITEMS for mention in PROMPT_MENTIONS]
    return out


def _digest(text: str) -> int:
    """A hash stable across processes and Python versions (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _split(split: str) -> list[str]:
    if split not in ("train", "test"):
        raise ValueError(f"reviews task: unknown prompt split {split!r}; expected 'train' or 'test'")
    held_out = split == "test"
    chosen = [p for p in _all_prompts() if (_digest(p) % TEST_SHARE == 0) == held_out]
    return sorted(chosen, key=_digest)  # a shuffled order, so any prefix mixes items and phrasings


def prompts(split: str, n: int) -> list[str]:
    """``n`` prompts of ``split`` ("train" or "test"; disjoint), in a fixed shuffled order.

    A split holds a few hundred prompts (train ~860, test ~220); asking for more repeats the
    split from its start, so any ``n`` works and the first prompts are always the same.
    """
    if n < 0:
        raise ValueError(f"reviews task: number of prompts must be >= 0, got {n}")
    pool = _split(split)
    return [pool[i % len(pool)] for i in range(n)]


def _sentence(rng: random.Random, item: str, sign: int, name_item: bool) -> str:
    """A random grammatical sentence (no ``"."``) about ``item`` whose value has ``sign``."""
    obj = f"the {item}" if name_item else "it"
    food = item in FOODS
    adjectives = {**GENERIC_ADJECTIVES, **(FOOD_ADJECTIVES if food else GOODS_ADJECTIVES)}
    if sign == 0:
        if rng.random() < 0.5:
            verb = rng.choice(FOOD_FACT_VERBS if food else GOODS_FACT_VERBS)
            return _join("i", verb, obj, rng.choice(TIMES))
        return _join(obj, "is", rng.choice([a for a, v in adjectives.items() if v == 0]))
    polar = [a for a, v in adjectives.items() if v != 0]
    while True:
        negate, kind = rng.random() < 0.25, rng.random()
        neg = "not" if negate else ""
        if kind < 0.5:
            text = _join(obj, "is", neg, rng.choice(("", *INTENSIFIERS)), rng.choice(polar))
        elif kind < 0.75:
            text = _join("i", "do" if negate else "", neg, rng.choice(("", "really")), rng.choice(tuple(FEELINGS)), obj)
        elif kind < 0.9:
            text = _join("i would", neg, "order" if food else "buy", obj, "again")
        else:
            text = _join("i would", neg, "recommend", obj)
        sentence = parse_sentence(text)
        assert sentence is not None, text  # the generator only writes grammatical sentences
        if (sentence.value > 0) == (sign > 0):
            return text


_MOODS = {  # the signs of a completion's sentences, by mood
    "positive": ((1,), (1, 1), (0, 1), (1, 1, 1), (0, 1, 1)),
    "negative": ((-1,), (-1, -1), (0, -1), (-1, -1, -1), (0, -1, -1)),
    "neutral": ((0,), (0, 0)),
    "mixed": ((1, -1), (1, -1, 0), (1, -1, 1), (-1, 1, -1)),
}


def sft_corpus(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` demonstration pairs ``{"prompt", "completion"}`` on train-split prompts.

    Moods are drawn evenly from positive, negative, neutral and mixed, so the SFT policy is
    roughly neutral and RL has room to improve. Completions are grammatical, on-topic and free
    of repeats, and carry no EOS text (the library appends EOS).
    """
    rng = random.Random(seed)
    pool = _split("train")
    corpus = []
    for _ in range(n):
        prompt = rng.choice(pool)
        item = prompt_item(prompt)
        signs = list(rng.choice(_MOODS[rng.choice(tuple(_MOODS))]))
        rng.shuffle(signs)
        signs.sort(key=lambda sign: sign != 0)  # a neutral sentence opens best ("i tried it ...")
        sentences: list[str] = []
        while len(sentences) < len(signs):
            sign = signs[len(sentences)]
            text = _sentence(rng, item, sign, name_item=not sentences or rng.random() < 0.3)
            if all(_as_it(text, item) != _as_it(s, item) for s in sentences):
                sentences.append(text)
        corpus.append({"prompt": prompt, "completion": " ".join(f"{s} ." for s in sentences)})
    return corpus


def vocabulary() -> list[str]:
    """Every word of the task (prompts and responses), sorted, without special tokens."""
    words = {".", ":", "?", "it", "the", "i", "is", "not", "do", "would", "again", *INTENSIFIERS}
    words.update(ITEMS, POLARITY, FACT_VERBS, *(t.split() for t in TIMES))
    words.update(*(p.split() for p in PROMPT_OPENERS + PROMPT_MENTIONS))
    return sorted(words)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the task's vocabulary, built locally (no download).

    Special ids: ``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, ``<bos>`` 3; nothing is added on
    encoding (the library decides about BOS). Decoding joins words with single spaces.
    """
    return word_tokenizer(vocabulary())


class ReviewsTask:
    """The reviews task behind ``"embedded:reviews"``; see the module docstring."""

    name = "reviews"
    max_prompt_tokens = 11  # longest prompt, in words (no BOS)
    max_response_tokens = 25  # longest corpus completion (3 sentences) plus EOS

    def build_tokenizer(self) -> PreTrainedTokenizerFast:
        return build_tokenizer()

    def sft_corpus(self, n: int, seed: int = 0) -> list[dict[str, str]]:
        return sft_corpus(n, seed)

    def prompts(self, split: str, n: int) -> list[str]:
        return prompts(split, n)

    def gold_reward(self, prompt: str, response: str, ended_with_eos: bool) -> float:
        return gold_reward(prompt, response, ended_with_eos)

    def gold_reward_batch(self, prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool]) -> list[float]:
        return gold_reward_batch(prompts, responses, ended)

    def is_grammatical(self, response: str) -> bool:
        return is_grammatical(response)
