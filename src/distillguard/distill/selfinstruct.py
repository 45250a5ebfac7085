"""Self-Instruct: new prompts bootstrapped from a few seed tasks through the teacher itself.

Wang et al. 2023 (and Alpaca, Taori et al. 2023): show the teacher a numbered list of tasks (some
human-written seeds, some it generated earlier) and let it continue the list; keep the new tasks
that pass a few filters and are not too close to any task already in the pool (ROUGE-L F1 at
most ``novelty``), and repeat until the pool holds ``n`` new tasks. The result is a prompt file
for ``distill harvest`` (JSONL, one ``{"id", "prompt"}`` a line).

Requests go through :func:`~distillguard.distill.harvest.harvest`, so they share its guarantees:
bounded concurrency, retries, the budget (reserved before sending) and the response store keyed by
the request's fingerprint. The rounds are deterministic given the store: round r's prompts are
drawn from an RNG seeded by (seed, r) and from the pool built by the earlier rounds' stored
answers, so a rerun after a crash rebuilds the same pool without sending anything already
answered, and continues. (A request that failed outright is sent again on the rerun; its new
answer can change the pool from there on, and answers stored for the old continuation stay in the
store, paid for and unused.)
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field, model_validator

from distillguard.distill.config import DistillConfig, Number
from distillguard.distill.harvest import HarvestConfig, HarvestReport, harvest
from distillguard.distill.prompts import Prompt
from distillguard.distill.store import ResponseStore
from distillguard.errors import ConfigError

# Written for distillguard: varied kinds of task (open writing, rewriting, classification,
# extraction, reasoning, code, advice, explanation), short enough to fit a few per prompt.
SEED_TASKS = (
    "Give three tips for staying focused while working from home.",
    "Explain why the sky is blue to a ten-year-old.",
    "Rewrite the following sentence in the passive voice: The committee approved the new budget.",
    "Classify each of these animals as a mammal, bird or reptile: dolphin, sparrow, iguana, bat.",
    "Write a short, polite email declining an invitation to a meeting.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "A shop sells pens at 3 for $2. How much do 12 pens cost?",
    "Write a Python function that returns the largest of three numbers.",
    "What are the main differences between a virus and a bacterium?",
    "Suggest a name for a bakery that specialises in sourdough bread.",
    "Translate 'Where is the train station?' into French and Spanish.",
    "List the steps to change a flat tyre on a bicycle.",
    "Is the following review positive or negative? 'The food was cold and the waiter ignored us.'",
    "Write a haiku about the first snow of winter.",
    "Explain what a database index is and when it helps.",
    "Give a one-paragraph argument for planting more trees in cities.",
    "Extract the dates mentioned in this text: 'The contract starts on 3 March 2024 and ends on 1 June 2025.'",
    "What is the difference between weather and climate?",
    "Write a SQL query that counts the orders placed by each customer.",
    "Plan a simple three-day itinerary for a first visit to Rome.",
    "Correct the grammar in this sentence: 'Me and him goes to the store yesterday.'",
    "Describe how a refrigerator keeps food cold.",
    "Create a multiple-choice question about the water cycle, with four options.",
    "Explain the meaning of the proverb 'A stitch in time saves nine.'",
)
PROMPT = "Come up with a series of tasks:\n\n{tasks}\nTask {next}:"
# Self-Instruct's filter: tasks a text-only model cannot do, or that ask for files and media.
BLOCKED_WORDS = (
    "image",
    "images",
    "graph",
    "graphs",
    "picture",
    "pictures",
    "file",
    "files",
    "map",
    "maps",
    "draw",
    "plot",
    "go to",
    "video",
    "audio",
    "music",
    "flowchart",
    "diagram",
)
_ITEM = re.compile(
    r"(?:^|\n)\s*(?:\**\s*Task\s*\d+\s*\**\s*[:.)-]\s*\**|\d{1,3}\s*[.)])\s*", re.IGNORECASE
)


# Defaults the CLI and the pipeline share for what is not a SelfInstructConfig setting: the seed
# tasks read from a prompt source (a listing shows 8 tasks and must fit the teacher's context),
# and the requests' temperature (new tasks need more variety than answers harvested to learn from)
# and length.
SEED_LIMIT = 24
SEED_MAX_CHARS = 300
SELF_INSTRUCT_TEMPERATURE = 1.0
# A continuation lists a few tasks; its last, cut, task is dropped (answer_tasks), so a longer
# answer buys little: the harvest's default (sized for whole answers) would triple the cost.
SELF_INSTRUCT_MAX_TOKENS = 256


class SelfInstructConfig(DistillConfig):
    """How the self-instruct rounds grow the task pool; ``distill self-instruct`` takes its
    options' defaults and help from these fields."""

    n: int = Field(100, description="new tasks wanted")
    seeds: tuple[str, ...] = Field(SEED_TASKS, description="seed tasks (default: 24 built-in)")
    human_per_prompt: int = Field(6, description="seed tasks shown per request (Self-Instruct: 6)")
    machine_per_prompt: int = Field(
        2, description="earlier generated tasks shown per request (Self-Instruct: 2)"
    )
    requests_per_round: int = Field(
        16, description="requests per round (the pool grows between rounds)"
    )
    max_rounds: int = Field(100, description="stop after this many rounds")
    novelty: Number = Field(
        0.7, description="drop a task whose ROUGE-L F1 to any task in the pool exceeds this"
    )
    min_words: int = Field(3, description="drop a task of fewer words")
    max_words: int = Field(150, description="drop a task of more words")
    seed: int = Field(0, description="seed of the rounds' task sampling")

    @model_validator(mode="after")
    def _check(self) -> SelfInstructConfig:
        if self.n < 1 or self.requests_per_round < 1 or self.max_rounds < 1:
            raise ConfigError("--n, --requests-per-round and --max-rounds must be at least 1")
        if len(self.seeds) < 1:
            raise ConfigError("self-instruct needs at least one seed task")
        if not 0.0 < self.novelty <= 1.0:
            raise ConfigError(f"--novelty {self.novelty}: use a ROUGE-L F1 in (0, 1]")
        return self


@dataclass
class SelfInstructReport:
    rounds: int = 0
    requests: int = 0  # answered requests used (earlier runs' included)
    candidates: int = 0  # tasks parsed out of the answers
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    harvest: dict = field(default_factory=dict)  # summed over the rounds of this run
    stopped: str = (
        ""  # done | max_rounds | budget | failed (requests failed after their retries: rerun)
    )
    unfinished: str | None = None  # with 'failed': what failed

    def to_dict(self) -> dict:
        return dict(vars(self))


def split_tasks(text: str) -> list[str]:
    """The tasks in a continuation of a numbered list: the text before the first number continues
    the open ``Task k:``; every ``Task m:`` or ``m.`` line starts another. A task is its first line:
    what follows is the teacher answering it or chatting, not the task."""
    items = (t.strip() for t in _ITEM.split(text))
    return [t.splitlines()[0].strip() for t in items if t]


def reject_reason(task: str, config: SelfInstructConfig) -> str | None:
    """Self-Instruct's heuristic filters; None when the task passes them."""
    words = task.split()
    if not config.min_words <= len(words) <= config.max_words:
        return "length"
    lowered = f" {task.lower()} "
    if any(re.search(rf"\b{re.escape(w)}\b", lowered) for w in BLOCKED_WORDS):
        return "blocked_word"
    if not task[0].isascii() or not task[0].isalnum():
        return "not_a_task_start"  # starts with punctuation or a non-English character
    if sum(c.isascii() for c in task) < 0.9 * len(task):
        return "non_english"
    return None


class NoveltyPool:
    """Tasks so far, and whether a new one is too close to any of them (ROUGE-L F1 > threshold).

    rouge_score computes each pair's LCS; pairs whose bag-of-words overlap already bounds the F1
    below the threshold are skipped first (LCS <= the multiset intersection), which a pool of
    thousands needs: most pairs share few words.
    """

    def __init__(self, threshold: float):
        from rouge_score import rouge_scorer, tokenize

        self.threshold = threshold
        self.scorer = rouge_scorer.RougeScorer(["rougeL"])
        self._tokenize = tokenize.tokenize
        self.tasks: list[str] = []
        self._bags: list[Counter] = []

    def add(self, task: str) -> None:
        self.tasks.append(task)
        self._bags.append(Counter(self._tokenize(task, None)))

    def too_close(self, task: str) -> bool:
        bag = Counter(self._tokenize(task, None))
        n = sum(bag.values())
        for other, other_bag in zip(self.tasks, self._bags):
            m = sum(other_bag.values())
            if not n or not m or 2 * sum((bag & other_bag).values()) / (n + m) <= self.threshold:
                continue
            if self.scorer.score(other, task)["rougeL"].fmeasure > self.threshold:
                return True
        return False


def round_prompts(config: SelfInstructConfig, machine: list[str], r: int) -> list[Prompt]:
    """Round r's requests: distinct task listings drawn by an RNG seeded by (seed, r)."""
    rng = random.Random(f"{config.seed}:{r}")
    listings: dict[str, None] = {}
    for _ in range(
        10 * config.requests_per_round
    ):  # a small pool may not allow as many distinct ones
        if len(listings) == config.requests_per_round:
            break
        shown = rng.sample(list(config.seeds), min(config.human_per_prompt, len(config.seeds)))
        shown += rng.sample(machine, min(config.machine_per_prompt, len(machine)))
        rng.shuffle(shown)
        body = "".join(f"Task {j}: {t}\n" for j, t in enumerate(shown, 1))
        listings.setdefault(PROMPT.format(tasks=body, next=len(shown) + 1))
    return [Prompt(f"self-instruct-r{r}-{i}", (("user", text),)) for i, text in enumerate(listings)]


def round_harvest_config(
    harvest_config: HarvestConfig, config: SelfInstructConfig, r: int
) -> HarvestConfig:
    """Each round's requests carry their own sampling seed: a listing drawn again in a later round
    is a new request (a new answer), not the stored one, and every answer is reproducible."""
    base = harvest_config.seed if harvest_config.seed is not None else config.seed * 100_003
    return harvest_config.replace(seed=base + r)


def answer_tasks(record: dict) -> list[str]:
    """The tasks of a stored answer. An answer cut off at ``max_tokens`` (the teacher went on
    listing) is still used, less its last task, which may be cut; the harvest keeps such answers
    out of its data, but here they are the common case."""
    tasks = []
    for choice in record["response"]["choices"]:
        found = split_tasks((choice.get("message") or {}).get("content") or "")
        tasks += found[:-1] if choice.get("finish_reason") == "length" else found
    return tasks


USABLE = ("ok", "malformed:truncated")


async def self_instruct(
    config: SelfInstructConfig,
    harvest_config: HarvestConfig,
    store: ResponseStore,
    *,
    on_round: Callable[[SelfInstructReport, list[str]], None] | None = None,
) -> tuple[list[str], SelfInstructReport]:
    """Grow the pool until it holds ``config.n`` new tasks (or the rounds or the budget run out)."""
    report = SelfInstructReport(stopped="max_rounds")
    pool = NoveltyPool(config.novelty)
    for seed in config.seeds:
        pool.add(seed)
    machine: list[str] = []
    totals = HarvestReport()

    def consider(task: str) -> None:
        report.candidates += 1
        why = reject_reason(task, config) or ("too_similar" if pool.too_close(task) else None)
        if why:
            report.dropped[why] = report.dropped.get(why, 0) + 1
        else:
            pool.add(task)
            machine.append(task)

    for r in range(config.max_rounds):
        prompts = round_prompts(config, machine, r)
        hconfig = round_harvest_config(harvest_config, config, r)
        got = await harvest(hconfig, prompts, store)
        for key in (
            "planned",
            "over_prompt_cap",
            "skipped_done",
            "sent",
            "stored_ok",
            "retries",
            "budget_stopped",
            "prompt_tokens",
            "completion_tokens",
            "cost_usd",
        ):
            setattr(totals, key, getattr(totals, key) + getattr(got, key))
        for key, value in [
            *got.malformed.items(),
            *((f"failed:{k}", v) for k, v in got.failed.items()),
        ]:
            totals.malformed[key] = totals.malformed.get(key, 0) + value
        answers = store.get_many(got.fingerprints)
        report.rounds += 1
        for fp in got.fingerprints:  # in the round's order, so a rerun rebuilds the same pool
            record = answers.get(fp)
            if len(machine) >= config.n or record is None or record["status"] not in USABLE:
                continue
            report.requests += 1
            for task in answer_tasks(record):
                if len(machine) < config.n:
                    consider(task)
        report.kept = len(machine)
        report.harvest = totals.to_dict()
        if on_round is not None:
            on_round(report, machine)
        if len(machine) >= config.n:
            report.stopped = "done"
            break
        if got.budget_stopped:
            report.stopped = "budget"
            break
        if got.transient_failures():
            # Requests that failed after their retries: going on would build the next rounds on a pool
            # a rerun cannot rebuild (it resends them and may get other tasks), and against a teacher
            # that is down, every round would spend its retries on nothing for up to max_rounds rounds.
            # (A request the teacher refused, e.g. 400 for a listing past its context, gets the same
            # answer on a rerun, so the rounds go on without it.)
            report.stopped = "failed"
            report.unfinished = got.unfinished()
            break
    return machine, report


def load_seed_tasks(
    source: str, *, limit: int = SEED_LIMIT, max_chars: int = SEED_MAX_CHARS
) -> tuple[str, ...]:
    """Seed tasks from any prompt source: each prompt's user turns, short ones only (a listing
    shows eight tasks and must fit the teacher's context with room for its answer)."""
    from distillguard.distill.prompts import load_prompts

    seeds = tuple(
        "\n".join(c for r, c in p.messages if r == "user")
        for p in load_prompts(source, limit=limit, max_chars=max_chars)
    )
    if not seeds:
        raise ConfigError(f"no seed tasks of at most {max_chars} characters in {source}")
    return seeds


def write_prompts(tasks: list[str], path: str | Path) -> None:
    """The tasks as a prompt file ``distill harvest --prompts`` reads."""
    with open(path, "w", encoding="utf-8") as fh:
        for i, task in enumerate(tasks):
            fh.write(
                json.dumps({"id": f"self-instruct-{i}", "prompt": task}, ensure_ascii=False) + "\n"
            )
