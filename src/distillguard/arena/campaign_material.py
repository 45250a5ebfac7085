"""Seed material of the templated campaigns (genres, subjects, templates, Evol-Instruct and
self-instruct wrappers, chain-of-thought suffixes, generated math and logic problems) and the
scheduling helpers several campaigns share. Kept apart from ``campaigns.py`` so that module
reads as the campaign kinds alone."""

from __future__ import annotations

import random
from collections.abc import Iterator

from distillguard.arena.base import CampaignContext

GENRES = (
    "poem",
    "short story",
    "haiku",
    "limerick",
    "essay",
    "blog post",
    "product description",
    "cover letter",
    "speech",
    "dialogue",
    "news article",
    "sonnet",
    "recipe",
    "tweet thread",
    "movie synopsis",
    "song",
    "fable",
    "press release",
    "children's story",
    "persuasive essay",
)
SUBJECTS = (
    "climate change",
    "a lost dog",
    "quantum computing",
    "the French Revolution",
    "remote work",
    "black holes",
    "the stock market",
    "friendship",
    "artificial intelligence",
    "the ocean",
    "a rainy Monday",
    "electric cars",
    "the Roman Empire",
    "meditation",
    "cryptocurrency",
    "photosynthesis",
    "the first day of school",
    "space exploration",
    "coffee",
    "democracy",
    "vaccines",
    "a haunted house",
    "the immune system",
    "social media",
    "renewable energy",
    "the Renaissance",
    "machine learning",
    "a small bakery",
    "inflation",
    "honeybees",
    "the water cycle",
    "video games",
    "the printing press",
    "sleep",
    "volcanoes",
    "a chess match",
    "supply chains",
    "the human brain",
    "urban gardening",
    "the Cold War",
    "plate tectonics",
    "minimalism",
    "a time traveller",
    "blockchain",
    "the Olympic Games",
    "antibiotics",
    "a lighthouse keeper",
    "public transport",
    "the theory of relativity",
    "recycling",
    "an old library",
    "the moon landing",
    "DNA",
    "startups",
    "a mountain village",
    "jazz",
    "cybersecurity",
    "the Silk Road",
    "nutrition",
    "robots",
    "a thunderstorm",
    "the internet",
    "ancient Egypt",
    "gravity",
    "a job interview",
    "wildfires",
    "the periodic table",
    "marathons",
)
AUDIENCES = (
    "a five-year-old",
    "a high-school student",
    "a university professor",
    "a busy CEO",
    "a software engineer",
    "a retiree",
    "a beginner",
    "an expert",
)
AUTHORS = ("Shakespeare", "Hemingway", "Dr. Seuss", "Jane Austen", "Edgar Allan Poe", "Mark Twain")
TEMPLATES = (
    "Write a {genre} about {subject}.",
    "Write a {genre} about {subject} for {audience}.",
    "Explain {subject} to {audience}.",
    "Give me {k} interesting facts about {subject}.",
    "List {k} pros and cons of {subject}.",
    "Summarize the key ideas of {subject} in {k} bullet points.",
    "Compare {subject} and {subject2} in a table.",
    "Write a {genre} in the style of {author} about {subject}.",
    "Generate {k} interview questions about {subject}, with model answers.",
    "Create a quiz with {k} multiple-choice questions on {subject}.",
    "What are the most common misconceptions about {subject}?",
    "Describe {subject} in exactly {k} sentences.",
)
# WizardLM's Evol-Instruct (Xu et al. 2023): in-depth and in-breadth rewriting of seed prompts.
EVOL_DEPTH = (
    "Add one more constraint or requirement to it.",
    "Replace general concepts with more specific ones.",
    "If it can be solved with a few simple thinking steps, rewrite it to explicitly request multiple-step reasoning.",
    "Increase the depth and breadth of the inquiry.",
)
EVOL_PROMPT = (
    "I want you to act as a Prompt Rewriter. Your objective is to rewrite a given prompt into a more "
    "complex version to make it harder for famous AI systems to handle, while keeping it reasonable "
    "and understandable by humans. {method} The rewritten prompt may only add 10 to 20 words.\n\n"
    "#The Given Prompt#:\n{prompt}\n\n#Rewritten Prompt#:"
)
EVOL_BREADTH = (
    "I want you to act as a Prompt Creator. Your goal is to draw inspiration from the #Given Prompt# "
    "to create a brand new prompt. It should belong to the same domain but be more rare. Its length "
    "and difficulty should be similar.\n\n#Given Prompt#:\n{prompt}\n\n#Created Prompt#:"
)
# Self-Instruct (Wang et al. 2023): bootstrap new tasks from a few seed tasks.
SELF_INSTRUCT = "Come up with a series of tasks:\n\n{tasks}\nTask {next}:"

COT_SUFFIXES = (
    "Let's think step by step.",
    "Think step by step and show your reasoning before giving the final answer.",
    "Show your reasoning.",
    "Put your reasoning inside <think></think> tags, then give the final answer.",
    "Explain your reasoning in detail, then write the answer on the last line as 'Answer: ...'.",
    "Reason carefully, step by step, before you answer.",
)
COT_SYSTEMS = (
    "You are a reasoning model. Always think inside <think> ... </think> before answering.",
    "You are a careful problem solver. Show all of your reasoning step by step.",
)
NAMES = ("Maria", "Ahmed", "Lena", "Kenji", "Priya", "Tom", "Sofia", "Omar", "Chloe", "Diego")
ITEMS = ("pencils", "apples", "notebooks", "tickets", "cupcakes", "marbles", "books", "stamps")


def _math_problem(rng: random.Random) -> str:
    """A GSM8K-style word problem or a short exercise, numbers drawn fresh each time."""
    a, b, c = rng.randint(2, 60), rng.randint(2, 30), rng.randint(3, 12)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    return rng.choice(
        (
            f"{name} buys {b} {item} at ${a} each and pays with a ${a * b + rng.randint(1, 50)} bill. "
            f"How much change does {name} get?",
            f"A train travels {a * c} km in {c} hours, then {b * 10} km at {b * 5} km/h. "
            "What is its average speed over the whole trip?",
            f"What is the sum of all integers from 1 to {a * 10} that are divisible by {c}?",
            f"Solve for x: {a}x + {b} = {a * c + b}.",
            f"How many ways can {c} people sit around a round table?",
            f"Find the derivative of {a}x^{c} + {b}x - {a + b}.",
            f"Two dice are rolled. What is the probability that the sum is at least {c}?",
            f"{name} has {a} {item}. {name} gives away {b % a or 1} and then buys {c} times as many as are left. "
            f"How many {item} does {name} have now?",
            f"A rectangle has a perimeter of {2 * (a + b)} cm and one side of {a} cm. What is its area?",
            f"Is {a * b + 1} a prime number?",
            f"A bank pays {c}% interest compounded yearly. "
            f"How much is ${a * 100} worth after {b % 10 + 2} years?",
            f"What is the remainder when {a}^{b} is divided by {c}?",
        )
    )


def _logic_puzzle(rng: random.Random) -> str:
    n = rng.randint(3, 6)
    return rng.choice(
        (
            "All bloops are razzies and some razzies are lazzies. Can we conclude that some bloops are lazzies?",
            f"On an island, knights always tell the truth and knaves always lie. Of {n} islanders, each says "
            f"'at least {n - 1} of us are knaves'. How many knights are there?",
            "A farmer must cross a river with a wolf, a goat and a cabbage; the boat holds one item besides him. How?",
            f"You have {n * 4} coins and one is heavier. What is the fewest weighings on a balance to find it?",
            f"If it takes {n} machines {n} minutes to make {n} widgets, "
            f"how long do {n * 20} machines take to make {n * 20} widgets?",
            "Three boxes are labelled apples, oranges and mixed, and every label is wrong. You may take one fruit "
            "from one box. How do you relabel them?",
            f"A clock shows 3:{n * 5:02d}. What is the angle between the hands?",
        )
    )


def _template_prompt(rng: random.Random, templates: tuple[str, ...] = TEMPLATES) -> str:
    s1, s2 = rng.sample(SUBJECTS, 2)
    return rng.choice(templates).format(
        genre=rng.choice(GENRES),
        subject=s1,
        subject2=s2,
        k=rng.randint(3, 10),
        audience=rng.choice(AUDIENCES),
        author=rng.choice(AUTHORS),
    )


def _evol(rng: random.Random, seed: str) -> str:
    if rng.random() < 0.7:
        return EVOL_PROMPT.format(method=rng.choice(EVOL_DEPTH), prompt=seed)
    return EVOL_BREADTH.format(prompt=seed)


def _self_instruct(rng: random.Random, seeds: list[str]) -> str:
    tasks = "".join(f"Task {i}: {s}\n" for i, s in enumerate(seeds, 1))
    return SELF_INSTRUCT.format(tasks=tasks, next=len(seeds) + 1)


def _short_seeds(prompts, limit: int = 400) -> list[str]:
    return [p for p, _, _ in prompts if len(p) <= limit]


def _work_shifts(
    rng: random.Random,
    ctx: CampaignContext,
    total: int,
    mean_gap: float,
    shift_h: tuple[float, float] = (2.0, 8.0),
) -> Iterator[float]:
    """Send times of a script run in shifts: ``total`` requests at exponential gaps of ``mean_gap``
    seconds, in shifts of a few hours with breaks between (an operator restarting jobs)."""
    t = ctx.start + rng.uniform(0, 0.25) * (ctx.end - ctx.start)
    sent = 0
    while sent < total and t < ctx.end:
        shift_end = t + rng.uniform(*shift_h) * 3600
        while sent < total and t < shift_end:
            yield t
            sent += 1
            t += rng.expovariate(1 / mean_gap)
        t += rng.uniform(0.5, 6.0) * 3600


def _by_topic_round_robin(rng: random.Random, prompts) -> list[tuple[str, int, str]]:
    """Prompts ordered to cover the topic space evenly: one from each topic in turn."""
    by_topic: dict[str, list] = {}
    for p in prompts:
        by_topic.setdefault(p[2], []).append(p)
    queues = [rng.sample(v, len(v)) for _, v in sorted(by_topic.items())]
    rng.shuffle(queues)
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop())
    return out
