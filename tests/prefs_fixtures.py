"""What tests/fixtures/prefs holds: its files and the records each parser should read from them."""

from __future__ import annotations

import json
from pathlib import Path

from lit_p3o.data.formats import PreferenceRecord

PREFS = Path(__file__).parent / "fixtures" / "prefs"
HH, TLDR, TRL = PREFS / "hh.jsonl", PREFS / "tldr.jsonl", PREFS / "trl.jsonl"
CONV, IMPLICIT = PREFS / "trl_conversational.jsonl", PREFS / "trl_conversational_implicit.jsonl"


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------- expected records

H, A = "\n\nHuman:", "\n\nAssistant:"
BREAD = (
    f"{H} I want to bake bread at home for the first time. What do I need?{A} Flour, water, salt and "
    f"yeast are enough for a basic loaf. A large bowl and an oven-safe pan help too.{H} How long does "
    f"the dough need to rise?{A}"
)
PLANT = (
    f"{H} My basil plant keeps wilting.{A} Is it in a pot or in the ground, and how often do you water "
    f"it?{H} In a pot on the windowsill, I water it every day.{A}"
)
CODE = (
    f"{H} How do I reverse a list in Python?{A} You can call my_list.reverse() to reverse it in place.{H} "
    f"What if I want to keep the original?{A}"
)
HH_RECORDS = [
    PreferenceRecord(
        BREAD,
        " Usually one to two hours at room temperature, until it has roughly doubled in size.",
        " Bread is one of the oldest prepared foods.",
    ),
    PreferenceRecord(
        PLANT,
        " Daily watering is probably too much. Let the top of the soil dry out between waterings and make "
        "sure the pot drains.",
        " Water it twice a day.",
    ),
    PreferenceRecord(
        CODE,
        " Use reversed(my_list) or the slice my_list[::-1]; both leave the original list unchanged.",
        " You can't.",
    ),
    PreferenceRecord(
        BREAD,
        " About an hour in a warm kitchen; poke it gently, and if the dent springs back slowly it is ready.",
        " Overnight, always.",
    ),
]
HH_BAD = {
    3: ("chosen/rejected", "the transcripts differ before the final Assistant reply"),
    4: ("chosen/rejected", "identical responses"),
    5: ("rejected", "empty response"),
    6: ("rejected", "missing"),
    7: ("chosen", "no '\\n\\nAssistant:' turn"),
}

TLDR_RECORDS = [
    PreferenceRecord(
        "SUBREDDIT: r/relationships\nTITLE: My roommate never cleans up after cooking\nPOST: We share a small "
        "kitchen and every evening the sink is full of his pans. I have asked him twice.\nTL;DR:",
        " roommate leaves dirty pans every night, asked twice, nothing changed.",
        " I have a roommate.",
    ),
    PreferenceRecord(  # choice 1, and the first summary gains its leading space
        "SUBREDDIT: r/personalfinance\nTITLE: Should I pay off my car loan early?\nPOST: The loan is at 6% and I "
        "have six months of savings in an account earning 4%.\nTL;DR:",
        " paying off car loan early makes sense since it costs more than savings earn",
        " car loan at 6%, savings at 4%, pay it early?",
    ),
    PreferenceRecord(
        "SUBREDDIT: r/books\nTITLE: Looking for sci-fi recommendations\nPOST: I loved The Left Hand of Darkness "
        "and want more like it.\nTL;DR:",
        " liked Le Guin, want similar sci-fi",
        " books?",
    ),
]
TLDR_BAD = {
    2: ("choice", "out of range (0 or 1)"),
    3: ("choice", "not an integer"),
    4: ("summaries", "expected a list of two summaries"),
    5: ("info", "missing"),
    6: ("chosen/rejected", "identical responses"),
}

TRL_RECORDS = [
    PreferenceRecord(
        "write a review of the pizza :", "the pizza is very tasty . i would order it again .", "the pizza is stale ."
    ),
    PreferenceRecord("what do you think of the lamp ?", "i really like the lamp .", "i hate it ."),
    PreferenceRecord(
        "please write a review of the soup for my blog :",
        "i tried the soup today . it is delicious .",
        "the soup is bland . i would not order it again . it is awful .",
    ),
    PreferenceRecord("rate the bike :", "i would recommend the bike .", "the bike is flimsy ."),
    PreferenceRecord("write a review of the pizza :", "i love the pizza .", "i dislike it ."),
]

CONV_RECORDS = [
    PreferenceRecord("<user> review the pizza :\n<assistant>", "the pizza is great .", "the pizza is bad ."),
    PreferenceRecord("<system> be brief\n<user> rate the mug :\n<assistant>", "i like it .", "it is noisy ."),
]
CONV_BAD = {
    2: ("chosen", "expected exactly one assistant message"),
    3: ("rejected", "the last message is not the assistant's"),
}
IMPLICIT_RECORDS = [
    PreferenceRecord("<user> review the cake :\n<assistant>", "the cake is delicious .", "the cake is stale ."),
    PreferenceRecord(
        "<user> rate the desk :\n<assistant> which desk ?\n<user> the desk\n<assistant>",
        "it is sturdy .",
        "it is flimsy .",
    ),
]
IMPLICIT_BAD = {
    2: ("chosen/rejected", "the conversations differ before the final assistant reply"),
    3: ("chosen", "no turns before the final assistant reply"),
}
