"""Training prompts made here, in bulk, for self-distillation (``meshd train-draft --write-prompts``).

A draft head learns what the target says; what the target says depends on what it is asked. A few
hundred hand-written prompts teach a head the openings of a few hundred answers, so this module makes
thousands, in the spread of a chat assistant's traffic, from three sources:

- **templates**: task phrasings crossed with topic, audience, length and style lists
  (explanations, how-to, stories, word problems with fresh numbers, advice, lists, code, rewriting,
  translation, comparisons, letters, summaries, plans, definitions);
- **the target's own questions**: it is asked to write a question someone might put to an assistant
  about a topic, sampled, and the answers that look like one question are kept (:func:`self_question_requests`,
  :func:`clean_question`);
- **follow-up turns**: a second user turn on the target's own first answer (:func:`follow_up_chats`),
  so the head also sees answers that continue a conversation.

Every prompt is checked against the evaluation prompts (the everyday set and Spec-Bench's held-out split)
by shared word 6-grams (:class:`Exclusion`): a generated prompt that repeats a run of six words of one is
dropped, so measured acceptance stays on prompts nobody trained on. Everything is seeded: the same
arguments give the same file.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from training.prompts import EVERYDAY, held_out_questions, load_questions

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from models.stage import Stage

Chat = list[dict]
"""A conversation as the chat template takes it: ``[{"role": ..., "content": ...}, ...]``."""

# Word lists, kept dense (several to a line).
# fmt: off
TOPICS = (
    "photosynthesis", "black holes", "the water cycle", "compound interest", "vaccines", "climate change",
    "the French Revolution", "machine learning", "plate tectonics", "the immune system", "inflation",
    "renewable energy", "the stock market", "sleep", "meditation", "the Roman Empire", "DNA", "volcanoes",
    "electric cars", "the internet", "blockchain", "gravity", "the printing press", "coral reefs", "antibiotics",
    "the moon landing", "recycling", "bees", "the Renaissance", "quantum computing", "credit scores",
    "the human heart", "tides", "earthquakes", "solar panels", "the Great Wall of China", "coffee", "jazz", "chess",
    "the Olympic Games", "rainforests", "the Industrial Revolution", "glaciers", "nutrition labels", "memory",
    "habits", "public speaking", "time management", "budgeting", "gardening", "composting", "marathon training",
    "learning a language", "job interviews", "remote work", "negotiation", "first aid", "home insurance",
    "renting an apartment", "adopting a dog", "caring for houseplants", "baking bread", "fermentation",
    "the metric system", "prime numbers", "probability", "fractions", "the Pythagorean theorem", "statistics",
    "encryption", "passwords", "cloud computing", "databases", "operating systems", "open source software",
    "smartphones", "batteries", "3D printing", "robots", "satellites", "Mars", "the Milky Way", "rainbows",
    "lightning", "hurricanes", "deserts", "oceans", "migration of birds", "dinosaurs", "evolution", "fungi",
    "the brain", "muscles", "vitamins", "allergies", "stress", "friendship", "volunteering", "minimalism",
    "travel on a budget", "packing for a trip", "camping", "photography", "drawing", "learning the guitar",
    "writing a novel", "poetry", "podcasts", "social media", "online privacy", "fake news", "democracy", "taxes",
    "small businesses", "marketing", "customer service", "teamwork", "leadership", "procrastination",
    "studying for exams", "note taking", "the scientific method", "electricity", "magnets", "sound waves", "light",
    "atoms", "chemical reactions", "the periodic table", "water treatment", "bridges", "skyscrapers", "trains",
    "airplanes", "bicycles", "traffic", "city planning", "libraries", "museums", "ancient Egypt", "the Silk Road",
    "the Vikings", "mythology", "folk tales", "tea", "chocolate", "spices", "vegetarian cooking", "meal planning",
    "food waste", "water conservation", "air pollution", "endangered species", "national parks", "the seasons",
    "time zones", "calendars", "maps", "languages", "emojis", "board games", "video games", "sports injuries",
    "yoga", "running shoes", "posture", "eyesight", "hearing", "dental care",
)
AUDIENCES = (
    "a ten-year-old", "a beginner", "a busy professional", "a high school student", "my grandmother",
    "someone who has never heard of it", "a college student", "a curious adult",
)
LENGTHS = (
    "in two sentences", "in one paragraph", "in about 100 words", "in three short paragraphs", "briefly",
    "in detail",
)
STYLES = (
    "funny", "heartwarming", "mysterious", "adventurous", "sad", "hopeful", "spooky", "whimsical",
)
CHARACTERS = (
    "a lonely robot", "a young baker", "an old lighthouse keeper", "a lost cat", "a retired teacher",
    "two rival chefs", "a shy dragon", "a girl who can talk to birds", "a delivery driver", "a time traveller",
    "a village doctor", "a talking tree", "an astronaut", "a street musician",
)
PLACES = (
    "a small mountain town", "a space station", "an underwater city", "a busy train station", "a forgotten library",
    "a desert island", "a rainy city", "a school at night", "a farm", "a market",
)
LANGS = (
    "French", "Spanish", "German", "Italian", "Portuguese", "Chinese", "Japanese",
)
NAMES = (
    "Maria", "Tom", "Aisha", "Ken", "Lena", "Omar", "Sofia", "Raj", "Emma", "Diego", "Yuki", "Sam",
)
ITEMS = (
    "apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "coins", "eggs", "stamps",
)
LANGUAGES = (
    "Python", "JavaScript", "C", "Java", "Go", "Rust", "SQL", "Bash",
)
CODE_TASKS = (
    "reverses a string", "checks whether a number is prime", "counts the words in a text",
    "finds the largest number in a list", "removes duplicates from a list", "converts Celsius to Fahrenheit",
    "computes the factorial of a number", "checks whether a word is a palindrome", "merges two sorted lists",
    "returns the n-th Fibonacci number", "reads a file and prints its lines", "sorts a list of names",
    "counts how often each letter appears", "validates an email address", "computes the average of a list",
    "finds the second smallest element", "flattens a nested list", "checks for balanced parentheses",
    "rounds a price to two decimals", "converts a date string to another format",
)
SENTENCES = (
    "me and him goes to the store yesterday and buyed three apple",
    "The meeting has been moved to Thursday because the manager is travelling.",
    "their going to announce the results tomorow, but nobody know what time",
    "I would like to return this jacket because it does not fit me.",
    "Our team finished the project two weeks early and under budget.",
    "The weather was so bad that the whole trip got cancelled at the last minute.",
    "she dont like coffee but she drink tea every morning",
    "Please remember to bring your own lunch to the picnic on Saturday.",
    "The new library opens next month and it will have a large children's section.",
    "We apologize for the delay in shipping your order.",
)
# fmt: on


TEMPLATES = {
    "explain": (
        "Explain {topic} to {audience}.",
        "What is {topic}? Answer {length}.",
        "How does {topic} work?",
        "Why is {topic} important?",
        "What are the most common misconceptions about {topic}?",
        "Give me a simple explanation of {topic} with an everyday example.",
        "What should everyone know about {topic}?",
        "Can you explain the basics of {topic} {length}?",
    ),
    "howto": (
        "How do I get started with {topic}?",
        "What are practical tips for {topic}?",
        "Give me a step-by-step guide to {topic} for {audience}.",
        "What mistakes do beginners make with {topic}, and how can I avoid them?",
    ),
    "story": (
        "Write a {style} short story about {character} in {place}.",
        "Tell me a {style} story for children about {character}.",
        "Write the opening paragraph of a {style} novel set in {place}.",
        "Write a short fable about {character} with a moral at the end.",
    ),
    "poem": (
        "Write a short {style} poem about {topic}.",
        "Write a haiku about {topic}.",
        "Write a limerick about {character}.",
    ),
    "list": (
        "List five interesting facts about {topic}.",
        "Give me ten ideas related to {topic}.",
        "What are the pros and cons of {topic}?",
        "List the key terms related to {topic} and define each one.",
        "Name three books or resources for learning about {topic} and say why each is useful.",
    ),
    "compare": (
        "Compare {topic} and {topic2}: how are they similar and how are they different?",
        "Which is more useful to learn about first, {topic} or {topic2}? Explain your reasoning.",
    ),
    "advice": (
        "I want to learn more about {topic} but I only have 15 minutes a day. What should I do?",
        "My friend is worried about {topic}. How can I help?",
        "I am a {audience_noun} and I feel overwhelmed by {topic}. Any advice?",
        "How can I make {topic} part of my daily routine?",
    ),
    "write": (
        "Write a short email to my manager asking for a day off next Friday.",
        "Write a polite message to a neighbour about {topic}.",
        "Write a product description for a new app about {topic}.",
        "Write a short speech for a school event about {topic}.",
        "Draft a social media post announcing a workshop on {topic}.",
        "Write a thank-you note to a teacher who taught me about {topic}.",
    ),
    "summarize": (
        "Summarize the history of {topic} {length}.",
        "Give me a one-paragraph summary of why {topic} matters today.",
    ),
    "plan": (
        "Make a one-week plan for learning about {topic}.",
        "Plan a weekend activity for a family that is interested in {topic}.",
        "Create a lesson plan about {topic} for {audience}.",
    ),
    "quiz": (
        "Write three multiple-choice questions about {topic} with the answers.",
        "Ask me five quiz questions about {topic}, then give the answers.",
    ),
}
AUDIENCE_NOUNS = ("student", "parent", "retiree", "nurse", "software developer", "teacher", "shop owner")


class Exclusion:
    """Word 6-grams of the evaluation prompts: a training prompt sharing one is too close to train on."""

    N = 6

    def __init__(self, texts: Iterable[str]):
        self.grams: set[tuple[str, ...]] = set()
        for t in texts:
            self.grams |= self._grams(t)

    @classmethod
    def _grams(cls, text: str) -> set[tuple[str, ...]]:
        words = re.findall(r"[a-z0-9']+", text.lower())
        return {tuple(words[i : i + cls.N]) for i in range(len(words) - cls.N + 1)}

    def hits(self, text: str) -> bool:
        return not self.grams.isdisjoint(self._grams(text))


def evaluation_texts(spec_bench: Path | None = None) -> list[str]:
    """Every prompt the project measures on: the everyday set, and Spec-Bench's held-out split if given."""
    texts = [t for q in load_questions(EVERYDAY) for t in q["turns"]]
    if spec_bench is not None:
        texts += [t for q in held_out_questions(spec_bench) for t in q["turns"]]
    return texts


def _fill(template: str, rng: random.Random) -> str:
    topic, topic2 = rng.sample(TOPICS, 2)
    return template.format(
        topic=topic,
        topic2=topic2,
        audience=rng.choice(AUDIENCES),
        audience_noun=rng.choice(AUDIENCE_NOUNS),
        length=rng.choice(LENGTHS),
        style=rng.choice(STYLES),
        character=rng.choice(CHARACTERS),
        place=rng.choice(PLACES),
    )


def word_problem(rng: random.Random) -> str:
    """An arithmetic word problem with fresh numbers (so the head learns the working, not the answers)."""
    a, b = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    x, y, z = rng.randint(12, 95), rng.randint(2, 11), rng.randint(2, 9)
    kind = rng.randrange(5)
    if kind == 0:
        q = f"{a} has {x} {item} and gives {y} to {b}. Then {a} buys {z} more. How many {item} does {a} have now?"
    elif kind == 1:
        q = f"{a} packs {x * z} {item} into boxes of {z}. How many boxes does {a} fill?"
    elif kind == 2:
        paid = y * z + x
        q = f"A shop sells {item} at ${y} each. {a} buys {z} and pays with ${paid}. How much change is left?"
    elif kind == 3:
        q = f"{a} reads {y} pages a day. The book has {x * y} pages. After how many days will {a} finish it?"
    else:
        q = f"{a} and {b} share {x * 2} {item}. {a} gets {y} more than {b}. How many does each get?"
    return q + rng.choice(("", " Think step by step.", " Show your work.", " Explain your answer."))


def code_prompt(rng: random.Random) -> str:
    lang, task = rng.choice(LANGUAGES), rng.choice(CODE_TASKS)
    return rng.choice(
        (
            f"Write a {lang} function that {task}.",
            f"Write a {lang} function that {task}, and explain how it works.",
            f"How would I write code in {lang} that {task}? Include an example.",
        )
    )


def edit_prompt(rng: random.Random) -> str:
    s = rng.choice(SENTENCES)
    return rng.choice(
        (
            f'Fix the grammar in this sentence: "{s}"',
            f'Rewrite this sentence to sound more formal: "{s}"',
            f'Rewrite this sentence to sound friendlier: "{s}"',
            f'Translate into {rng.choice(LANGS)}: "{s}"',
            f'Make this sentence shorter without losing its meaning: "{s}"',
        )
    )


def template_prompts(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct prompts from the templates, the task kinds mixed in fixed proportions."""
    rng = random.Random(seed)
    kinds = [*TEMPLATES, "math", "math", "code", "code", "edit"]
    out: dict[str, None] = {}
    tries = 0
    while len(out) < count and tries < count * 50:
        tries += 1
        kind = rng.choice(kinds)
        if kind == "math":
            text = word_problem(rng)
        elif kind == "code":
            text = code_prompt(rng)
        elif kind == "edit":
            text = edit_prompt(rng)
        else:
            text = _fill(rng.choice(TEMPLATES[kind]), rng)
        out[text] = None
    return list(out)


def self_question_requests(count: int, seed: int = 0) -> list[str]:
    """Instructions that ask the target to write one question a user might ask, about a topic."""
    rng = random.Random(seed + 1)
    asks = (
        "Write one question that a curious person might ask an AI assistant about {topic}. "
        "Reply with the question only.",
        "Write a question about {topic} that {audience} might ask. Reply with the question only.",
        "Think of a practical question someone could have about {topic}. Write only the question.",
        "Write a request that starts with 'How' or 'Why' about {topic}. Reply with the request only.",
    )
    return [_fill(rng.choice(asks), rng) for _ in range(count)]


def clean_question(text: str) -> str | None:
    """The target's answer to a :func:`self_question_requests` instruction as a prompt, or None when it
    is not one short question (several lines, an answer instead of a question, too short or long)."""
    t = text.strip().strip('"').strip()
    t = re.sub(r"^(question|q)\s*[:.]\s*", "", t, flags=re.IGNORECASE).strip().strip('"')
    if "\n" in t or not 20 <= len(t) <= 220 or not t.endswith(("?", ".")):
        return None
    if t.endswith(".") and not re.match(r"(how|why|what|explain|describe|tell|give|can|could)\b", t, re.I):
        return None
    return t


FOLLOW_UPS = (
    "Can you explain that more simply?",
    "Can you give me a concrete example?",
    "Thanks! Can you summarize that in three bullet points?",
    "What would you add if I had more time?",
    "Why is that? Please explain your reasoning.",
    "Can you make it shorter?",
    "What are the most common mistakes here?",
    "Could you continue?",
)


def follow_up_chats(answers: Sequence[tuple[str, str]], count: int, seed: int = 0) -> list[Chat]:
    """Second turns: ``(question, the target's answer)`` pairs each get a follow-up user message."""
    rng = random.Random(seed + 2)
    picked = rng.sample(list(answers), min(count, len(answers)))
    return [
        [
            {"role": "user", "content": q},
            {"role": "assistant", "content": a.strip()},
            {"role": "user", "content": rng.choice(FOLLOW_UPS)},
        ]
        for q, a in picked
        if a.strip()
    ]


def keep_new(prompts: Iterable[str | Chat], exclusion: Exclusion, seen: set[str]) -> list[str | Chat]:
    """Prompts not too close to an evaluation prompt and not already in ``seen`` (updated)."""
    out = []
    for p in prompts:
        text = p if isinstance(p, str) else " ".join(m["content"] for m in p if m["role"] == "user")
        key = " ".join(text.lower().split())
        if key in seen or exclusion.hits(text):
            continue
        seen.add(key)
        out.append(p)
    return out


def write_prompts(path: Path, prompts: Sequence[str | Chat]) -> None:
    """One JSON object a line: ``{"prompt": text}`` or ``{"messages": chat}`` (what the reader takes)."""
    lines = [json.dumps({"prompt": p} if isinstance(p, str) else {"messages": p}, ensure_ascii=False) for p in prompts]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def make_prompt_set(
    stage: Stage,
    tok: PreTrainedTokenizerBase,
    *,
    count: int,
    answers: Sequence[tuple[str, str]] = (),
    spec_bench: Path | None = None,
    seed: int = 0,
    slots: int = 64,
    eos: Sequence[int] = (),
) -> list[str | Chat]:
    """``count`` new training prompts: a fifth written by the target itself (sampled), up to a tenth
    follow-up turns on ``answers`` (``(question, answer)`` pairs the target already gave), the rest
    from templates; none shares a word 6-gram with an evaluation prompt, none repeats."""
    from models.text import encode_messages
    from training.log import log
    from training.rollouts import batch_generate

    exclusion = Exclusion(evaluation_texts(spec_bench))
    seen: set[str] = set()
    n_self = count // 5
    n_follow = min(count // 10, len(answers))
    n_tmpl = count - n_self - n_follow
    out = keep_new(template_prompts(n_tmpl + n_tmpl // 5, seed), exclusion, seen)[:n_tmpl]
    log(f"prompts: {len(out)} from templates")
    if n_self:
        asks = self_question_requests(2 * n_self, seed)
        chats = [(str(i), encode_messages(tok, [{"role": "user", "content": a}])) for i, a in enumerate(asks)]
        log(f"prompts: the target writes {len(asks)} questions (sampled at T=0.9), keeping up to {n_self}")
        # at most 48 tokens each: the bar's total is that bound, and it ends early when answers stop sooner
        with tqdm(total=48 * len(asks), unit="tok", desc="questions", file=sys.stderr) as bar:
            rolls = batch_generate(
                stage, chats, max_new=48, slots=slots, temperature=0.9, seed=seed, eos=eos, progress=bar
            )
        written = [clean_question(tok.decode(r.tokens[r.prompt_len :], skip_special_tokens=True)) for r in rolls]
        mine = keep_new([q for q in written if q], exclusion, seen)[:n_self]
        looked = sum(q is not None for q in written)
        log(f"prompts: {len(mine)} written by the target ({looked} looked like one question)")
        out += mine
    if n_follow:
        follow = keep_new(follow_up_chats(answers, n_follow, seed), exclusion, seen)
        log(f"prompts: {len(follow)} follow-up turns on the target's own answers")
        out += follow
    return out
