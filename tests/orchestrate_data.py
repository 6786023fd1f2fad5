"""A small intent data set for the orchestration tests: templates x slot values, plus out-of-scope texts."""
import itertools
import random

TEMPLATES = {
    "weather": ["what is the weather in {x}", "will it rain in {x} tomorrow", "forecast for {x} this week",
                "is it sunny in {x}", "how cold is it in {x} today", "temperature in {x} right now"],
    "search": ["find documents about {y}", "search the docs for {y}", "look up {y} in the index",
               "which pages mention {y}", "retrieve notes on {y}", "show sources about {y}"],
    "code": ["write a python function that {z}", "fix this code so it {z}", "implement a class that {z}",
             "refactor the script that {z}", "debug my program that {z}", "give me code that {z}"],
}
SLOTS = {"x": ["Oslo", "Paris", "Tokyo", "Lima", "Cairo", "Perth"],
         "y": ["sqlite", "hnsw graphs", "tokenizers", "bm25 ranking", "vector search", "chat templates"],
         "z": ["sorts a list", "parses json", "reads a csv file", "merges two dicts", "counts words", "reverses a string"]}
OUT_OF_SCOPE = ["tell me a joke about cats", "who won the football match", "play some jazz music",
                "what is the meaning of life", "book a table for two", "translate hello into german",
                "how tall is mount everest", "order a pizza with olives", "set an alarm for seven",
                "recommend a good novel", "call my mother", "how old is the universe"]


def intent_data(seed=0):
    rng = random.Random(seed)
    rows = []
    for intent, temps in TEMPLATES.items():
        slot = {"weather": "x", "search": "y", "code": "z"}[intent]
        for t, v in itertools.product(temps, SLOTS[slot]):
            rows.append((t.format(**{slot: v}), intent))
    rows += [(t, "unknown") for t in OUT_OF_SCOPE]
    rng.shuffle(rows)
    return [r[0] for r in rows], [r[1] for r in rows]
