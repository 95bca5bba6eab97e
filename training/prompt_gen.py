"""A large, diverse self-distillation prompt set made here: task templates over topics, deduplicated.

The head learns what the target says; the broader the prompts, the less it is surprised by a user's.
Every prompt is built from the tables below (no downloads): a task (explain, how-to, story, list,
arithmetic word problem, code, rewrite, translate, compare, advice, a two-turn continuation) over a
topic, with numbers, names and styles drawn from a seeded generator, so the same ``(n, seed)`` always
gives the same prompts in the same order. Prompts are deduplicated on normalised text, and the set
is checked against the evaluation prompts (the everyday set and any Spec-Bench file given), which
must never be trained on: :func:`assert_disjoint` raises if one slipped in.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from pathlib import Path

from training.prompts import is_held_out, read_spec_bench

EVERYDAY = Path(__file__).resolve().parents[1] / "meshd" / "lab" / "prompts" / "everyday.jsonl"

TOPICS = (
    "photosynthesis",
    "black holes",
    "the water cycle",
    "compound interest",
    "vaccines",
    "volcanoes",
    "the French Revolution",
    "machine learning",
    "sourdough bread",
    "plate tectonics",
    "inflation",
    "the immune system",
    "solar panels",
    "coral reefs",
    "the printing press",
    "sleep",
    "habit formation",
    "electric cars",
    "the Roman Empire",
    "climate change",
    "public speaking",
    "composting",
    "chess openings",
    "jazz",
    "the stock market",
    "recycling",
    "bees",
    "the moon landing",
    "earthquakes",
    "nutrition labels",
    "time zones",
    "password security",
    "the human heart",
    "rainbows",
    "tea",
    "migration of birds",
    "wind turbines",
    "budgeting",
    "the Silk Road",
    "antibiotics",
    "memory",
    "gardening in small spaces",
    "the internet",
    "ocean tides",
    "coffee",
    "marathon training",
    "the Renaissance",
    "glaciers",
    "vitamins",
    "3D printing",
    "origami",
    "renting an apartment",
    "job interviews",
    "dogs",
    "cats",
    "bicycles",
    "thunderstorms",
    "the periodic table",
    "languages",
    "libraries",
    "museums",
    "board games",
    "camping",
)
AUDIENCES = ("a ten-year-old", "a beginner", "a busy adult", "a high-school student", "a grandparent", "an expert")
STYLES = ("in simple words", "in three short paragraphs", "with one everyday example", "briefly", "step by step")
NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jun", "Kofi", "Lena", "Maya", "Noor")
ITEMS = ("apples", "pencils", "stickers", "books", "marbles", "cookies", "stamps", "tickets", "cards", "eggs")
LANGUAGES = ("French", "Spanish", "German", "Italian", "Portuguese")
CODE_TASKS = (
    "reverses the words in a sentence",
    "counts the vowels in a string",
    "checks whether a number is prime",
    "merges two sorted lists",
    "finds the most common word in a text",
    "converts Celsius to Fahrenheit",
    "removes duplicates from a list while keeping order",
    "computes the nth Fibonacci number",
    "validates an email address roughly",
    "groups a list of words by their first letter",
    "reads a CSV file and sums a column",
    "flattens a nested list",
    "checks whether brackets are balanced",
)
CODE_LANGS = ("Python", "JavaScript", "Python", "Go", "C", "Rust")
SENTENCES = (
    "The meeting has been moved to Thursday because the room was double booked.",
    "Our team finished the project two days early and under budget.",
    "Please remember to bring your own water bottle to the hike on Saturday.",
    "The library will be closed for renovations until the end of the month.",
    "I think we should try the new restaurant near the station this weekend.",
    "The results of the survey show that most people prefer working from home.",
    "Heavy rain is expected tomorrow, so the football match may be cancelled.",
)
REWRITES = ("more formal", "friendlier", "shorter", "clearer for a child", "more persuasive", "into a question")


def _explain(r: random.Random) -> str:
    t = r.choice(TOPICS)
    return r.choice(
        (
            f"Explain {t} to {r.choice(AUDIENCES)} {r.choice(STYLES)}.",
            f"What is the most important thing to know about {t}?",
            f"Why does {t} matter in everyday life?",
            f"What are common misconceptions about {t}?",
            f"Give a short history of {t}.",
        )
    )


def _howto(r: random.Random) -> str:
    t = r.choice(TOPICS)
    return r.choice(
        (
            f"How do I get started with {t}? Give the steps.",
            f"How can I learn more about {t} in a month? Make a plan.",
            f"What should a beginner avoid when it comes to {t}?",
        )
    )


def _story(r: random.Random) -> str:
    return r.choice(
        (
            f"Write a short story about {r.choice(NAMES)} and {r.choice(TOPICS)}.",
            f"Write a poem of eight lines about {r.choice(TOPICS)}.",
            f"Write a children's bedtime story in which {r.choice(NAMES)} discovers {r.choice(TOPICS)}.",
            f"Write the opening paragraph of a mystery novel set in a museum about {r.choice(TOPICS)}.",
        )
    )


def _list(r: random.Random) -> str:
    n = r.randint(3, 10)
    t = r.choice(TOPICS)
    return r.choice(
        (
            f"List {n} facts about {t}.",
            f"Give me {n} tips related to {t}, one line each.",
            f"Name {n} questions a curious person might ask about {t}.",
        )
    )


def _math(r: random.Random) -> str:
    a, b, c = r.randint(5, 90), r.randint(2, 40), r.randint(2, 12)
    name, other, item = r.choice(NAMES), r.choice(NAMES), r.choice(ITEMS)
    return r.choice(
        (
            f"{name} has {a} {item} and gives {min(b, a)} to {other}. Then {name} buys {c} packs of 5 more. "
            f"How many does {name} have now? Explain your reasoning.",
            f"A shop sells {item} at {c} for {b} cents. How much do {c * r.randint(2, 6)} {item} cost? "
            "Show your steps.",
            f"A train travels {a * 5} km in {c} hours. What is its average speed? Then how long would "
            f"{b * 10} km take at that speed?",
            f"Solve for x: {c}x + {b} = {c * a + b}. Show each step.",
            f"{name} saves {b} dollars a week. How many weeks until {name} has {b * a} dollars?",
        )
    )


def _code(r: random.Random) -> str:
    task, lang = r.choice(CODE_TASKS), r.choice(CODE_LANGS)
    return r.choice(
        (
            f"Write a {lang} function that {task}.",
            f"Write a {lang} function that {task}, and explain how it works.",
            f"Write a {lang} function that {task}, with two small tests.",
        )
    )


def _rewrite(r: random.Random) -> str:
    return f'Rewrite this sentence to be {r.choice(REWRITES)}: "{r.choice(SENTENCES)}"'


def _translate(r: random.Random) -> str:
    return f'Translate into {r.choice(LANGUAGES)}: "{r.choice(SENTENCES)}"'


def _compare(r: random.Random) -> str:
    a, b = r.sample(TOPICS, 2)
    return f"Compare {a} and {b}: what do they have in common, and how do they differ?"


def _advice(r: random.Random) -> str:
    t = r.choice(TOPICS)
    return r.choice(
        (
            f"My friend {r.choice(NAMES)} wants to get into {t} but has little time. What would you suggest?",
            f"I feel overwhelmed by {t}. How should I approach it?",
        )
    )


def _continue(r: random.Random) -> str:
    """A two-turn conversation flattened into one message (the follow-up refers to the first answer)."""
    t = r.choice(TOPICS)
    follow = r.choice(("Now give an example.", "Can you make that shorter?", "What would an expert add?"))
    return f"Earlier you explained {t} to me. {follow} Keep it about {t}."


TASKS = {
    "explain": _explain, "howto": _howto, "story": _story, "list": _list, "math": _math, "code": _code,
    "rewrite": _rewrite, "translate": _translate, "compare": _compare, "advice": _advice, "continue": _continue,
}  # fmt: skip


def normalise(text: str) -> str:
    """What two prompts must differ in to count as different: letters and digits, lower case."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def generate_prompts(n: int, seed: int = 0, max_tries: int = 20) -> list[tuple[str, str]]:
    """``n`` distinct (key, prompt) pairs, the tasks tried in turn (a task whose combinations are used
    up just stops contributing); raises when the tables cannot give ``n``."""
    r = random.Random(seed)
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    names = list(TASKS)
    for attempt in range(max_tries * n):
        if len(out) >= n:
            break
        task = names[attempt % len(names)]
        text = TASKS[task](r)
        if normalise(text) not in seen:
            seen.add(normalise(text))
            out.append((f"gen{seed}:{len(out)}:{task}", text))
    if len(out) < n:
        raise ValueError(f"only {len(out)} distinct prompts from the templates; ask for fewer than {n}")
    return out


def evaluation_texts(spec_bench: Path | None = None, everyday: Path = EVERYDAY) -> set[str]:
    """Normalised texts that must never be trained on: every everyday prompt's turns and Spec-Bench's held-out split."""
    texts: set[str] = set()
    for line in everyday.read_text().splitlines():
        if line.strip():
            texts.update(normalise(t) for t in json.loads(line)["turns"])
    if spec_bench is not None:
        for q in read_spec_bench(spec_bench):
            if is_held_out(int(q["question_id"])):
                texts.update(normalise(t) for t in q["turns"])
    return texts


def assert_disjoint(prompts: Iterable[tuple[str, str]], forbidden: set[str]) -> None:
    """Raise if any training prompt is (after normalisation) an evaluation prompt."""
    hits = [key for key, text in prompts if normalise(text) in forbidden]
    if hits:
        raise AssertionError(
            f"{len(hits)} training prompts are evaluation prompts (first: {hits[0]}); never train on them"
        )
