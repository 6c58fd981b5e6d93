"""A deterministic, procedurally generated English corpus a tiny model can learn quickly.

Every document is built from one template family with a small closed vocabulary and
strong regularities (fixed object colours, arithmetic that is always right, sequences in
order), so the next-token loss falls clearly within a hundred steps. Only
`random.Random(seed)` is used, so the corpus is identical on every machine.
"""

from __future__ import annotations

import random
from typing import Callable

# Bump when the generator's output changes, so cached corpora are rebuilt.
CORPUS_VERSION = 1

MIN_WORDS = 20
MAX_WORDS = 120

COLOUR_OF = {
    "sky": "blue", "sea": "blue", "grass": "green", "leaf": "green", "frog": "green",
    "sun": "yellow", "lemon": "yellow", "banana": "yellow", "snow": "white", "milk": "white",
    "chalk": "white", "coal": "black", "crow": "black", "night": "black", "apple": "red",
    "rose": "red", "cherry": "red", "plum": "purple", "cloud": "grey", "carrot": "orange",
}
COLOURS = ["red", "blue", "green", "brown", "white", "black", "grey", "yellow"]
ANIMALS = ["fox", "cat", "dog", "bird", "mouse", "horse", "rabbit", "bear", "duck", "goat"]
PLACES = ["river", "forest", "hill", "town", "garden", "lake", "farm", "house"]
MOVES = ["ran", "walked", "went", "jumped", "hopped", "raced"]
FEELINGS = ["happy", "tired", "hungry", "sleepy", "glad", "calm"]
NAMES = ["tom", "anna", "ben", "lucy", "sam", "mia", "leo", "ella"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august",
          "september", "october", "november", "december"]
LETTERS = list("abcdefghijklmnopqrstuvwxyz")


def _story(rng: random.Random) -> str:
    name, colour, animal = rng.choice(NAMES), rng.choice(COLOURS), rng.choice(ANIMALS)
    place, move, feeling = rng.choice(PLACES), rng.choice(MOVES), rng.choice(FEELINGS)
    return (f"{name} had a {colour} {animal}. the {colour} {animal} {move} to the {place}. "
            f"at the {place} the {animal} was {feeling}. then {name} and the {animal} went home.")


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    op = rng.choice(["plus", "minus", "times"])
    if op == "plus":
        return f"{a} plus {b} is {a + b}."
    if op == "minus":
        a, b = max(a, b), min(a, b)
        return f"{a} minus {b} is {a - b}."
    return f"{a} times {b} is {a * b}."


def _counting(rng: random.Random) -> str:
    step = rng.choice([1, 1, 2, 5, 10])
    start = step * rng.randint(0, 10)
    count = rng.randint(5, 10)
    numbers = " ".join(str(start + i * step) for i in range(count))
    return f"count by {step}: {numbers}."


def _cycle(items: list[str], rng: random.Random, min_len: int) -> list[str]:
    start, length = rng.randrange(len(items)), rng.randint(min_len, len(items))
    return [items[(start + i) % len(items)] for i in range(length)]


def _days(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return "the days in order are " + " ".join(_cycle(DAYS, rng, 3)) + "."
    i = rng.randrange(len(DAYS))
    return f"after {DAYS[i]} comes {DAYS[(i + 1) % len(DAYS)]}."


def _months(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return "the months in order are " + " ".join(_cycle(MONTHS, rng, 3)) + "."
    i = rng.randrange(len(MONTHS))
    return f"after {MONTHS[i]} comes {MONTHS[(i + 1) % len(MONTHS)]}."


def _letters(rng: random.Random) -> str:
    start = rng.randrange(len(LETTERS) - 5)
    return "the letters are " + " ".join(LETTERS[start:start + rng.randint(5, 12)]) + "."


def _colours(rng: random.Random) -> str:
    thing = rng.choice(sorted(COLOUR_OF))
    if rng.random() < 0.5:
        return f"the {thing} is {COLOUR_OF[thing]}."
    return f"what colour is the {thing}? the {thing} is {COLOUR_OF[thing]}."


TEMPLATES: list[Callable[[random.Random], str]] = [
    _story, _arithmetic, _counting, _days, _months, _letters, _colours,
]


def _document(rng: random.Random) -> str:
    """Sentences of one template family until a target of 20-100 words (never over 120)."""
    template = rng.choice(TEMPLATES)
    target = rng.randint(MIN_WORDS, 100)
    sentences: list[str] = []
    words = 0
    while words < target:
        sentence = template(rng)
        n = len(sentence.split())
        if words + n > MAX_WORDS:
            break
        sentences.append(sentence)
        words += n
    return " ".join(sentences)


def generate_corpus(num_documents: int, seed: int) -> list[str]:
    """`num_documents` lower-case English documents of 20-120 words, fixed by `seed`."""
    if num_documents < 0:
        raise ValueError(f"num_documents={num_documents}: must be >= 0")
    rng = random.Random(seed)
    return [_document(rng) for _ in range(num_documents)]
