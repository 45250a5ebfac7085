"""A distiller who knows about watermarks and canaries: scrub the harvested answers before training.

The lexical attacks of the watermark literature (Kirchenbauer et al. 2023, §7; Kuditipudi et
al. 2023; SynthID-Text's robustness section), seeded and deterministic, applied to each
teacher answer in this order:

- **delete**: each word dropped with probability r;
- **substitute**: each word the synonym table knows replaced, with probability r, by its
  nearest whole-word neighbour in a model's input-embedding table (:class:`SynonymTable`);
- **swap**: walking left to right, each word swapped with the next with probability r (a
  swapped pair is not touched again);
- **reorder**: the same for adjacent sentences;
- **truncate**: only the first K words kept.

Then two dataset-level moves:

- **mix**: answers written by another model (ShareGPT's ChatGPT answers to other prompts)
  added so that they are a fraction ρ of the teacher-plus-other rows;
- **drop outliers** (canary filtering): the q share of teacher answers that look least like the
  rest dropped, by a model-free rarity score (the mean surprisal of an answer's words under the
  other answers' document frequencies: invented names score high) or by the model's per-token
  NLL of the answer given its prompt. Filtering runs first, on the teacher's answers as they
  came, because that is where a canary sits.

No paraphrasing model: the only generative model bundled is the teacher itself, and a
paraphrase by the teacher is teacher text again. Synonyms come from the teacher's own
embedding table because no thesaurus is bundled and there is no network; its nearest
neighbours are often related words rather than synonyms ("quickly" -> "rapidly", but also
"Monday" -> "Tuesday"), which is what a watermark cares about (the token changed) and what the
student pays for (the cost is measured in ``bench/scrub_evidence.py``).

Every edit draws from ``random.Random`` seeded by (seed, row index), so a scrub is the same on
every run and machine, and two rows never share a stream.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydantic import Field, model_validator

from distillguard.distill.config import DistillConfig, Number
from distillguard.errors import ConfigError

OUTLIER_SCORES = ("rarity", "nll")
_SPACE = re.compile(r"(\s+)")
_SENTENCE_END = re.compile(r"(?<=[.!?])(\s+)")
# a word's letters with the punctuation around it ("(quickly)," -> "(", "quickly", "),")
_CORE = re.compile(r"^(\W*)([A-Za-z]{2,})(\W*)$")
_WORDS = re.compile(r"\w+", re.UNICODE)


class Scrub(DistillConfig):
    """What ``distill curate`` does to the harvested answers before its own filters (all off by
    default); the ``--scrub-*``, ``--mix-other``, ``--drop-outliers`` options come from here."""

    scrub_delete: Number = Field(0.0, description="delete each word with this probability")
    scrub_substitute: Number = Field(
        0.0,
        description="replace each word the synonym table knows (a whole-word token of "
        "--scrub-model) with its nearest embedding neighbour, with this probability",
    )
    scrub_swap: Number = Field(
        0.0, description="swap each word with the next with this probability"
    )
    scrub_reorder: Number = Field(
        0.0, description="swap each sentence with the next with this probability"
    )
    scrub_truncate: int | None = Field(None, description="keep only the first K words")
    mix_other: Number = Field(
        0.0,
        description="add ShareGPT's ChatGPT answers to other prompts until they are this share "
        "of the rows (non-teacher data)",
    )
    drop_outliers: Number = Field(
        0.0,
        description="drop this share of the answers that look least like the rest (canary "
        "filtering), by --outlier-score",
    )
    outlier_score: str = Field(
        "rarity",
        description="rarity (mean surprisal of an answer's words in the other answers) | nll "
        "(--scrub-model's NLL of the answer given its prompt)",
    )
    scrub_model: str = Field(
        "smollm2",
        description="model whose input embeddings give the synonyms and whose NLL scores "
        "outliers (--outlier-score nll)",
    )
    scrub_seed: int = Field(0, description="seed of every random edit")

    @model_validator(mode="after")
    def _check(self) -> Scrub:
        for name in ("scrub_delete", "scrub_substitute", "scrub_swap", "scrub_reorder"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ConfigError(f"--{name.replace('_', '-')} {value}: a probability in [0, 1]")
        if not 0 <= self.mix_other < 1:
            raise ConfigError(
                f"--mix-other {self.mix_other}: a share in [0, 1) (1 would leave no teacher data)"
            )
        if not 0 <= self.drop_outliers < 1:
            raise ConfigError(f"--drop-outliers {self.drop_outliers}: a share in [0, 1)")
        if self.scrub_truncate is not None and self.scrub_truncate < 1:
            raise ConfigError(f"--scrub-truncate {self.scrub_truncate}: keep at least 1 word")
        if self.outlier_score not in OUTLIER_SCORES:
            raise ConfigError(
                f"--outlier-score {self.outlier_score!r}: use {' or '.join(OUTLIER_SCORES)}"
            )
        return self

    @property
    def edits_text(self) -> bool:
        return bool(
            self.scrub_delete
            or self.scrub_substitute
            or self.scrub_swap
            or self.scrub_reorder
            or self.scrub_truncate is not None
        )

    @property
    def active(self) -> bool:
        return self.edits_text or bool(self.mix_other or self.drop_outliers)

    @property
    def needs_model(self) -> bool:
        return bool(self.scrub_substitute) or (
            bool(self.drop_outliers) and self.outlier_score == "nll"
        )


@dataclass
class Edits:
    """How often one edit fired: ``changed`` of ``trials`` draws (words, or sentence gaps)."""

    trials: int = 0
    changed: int = 0

    def add(self, other: Edits) -> None:
        self.trials += other.trials
        self.changed += other.changed

    @property
    def rate(self) -> float:
        return self.changed / self.trials if self.trials else 0.0


# ---- text edits: each takes the text and a Random, returns (text, Edits) ----------------------


def _split(text: str) -> tuple[str, list[str], list[str]]:
    """(leading whitespace, words, the whitespace after each word) of ``text``."""
    parts = _SPACE.split(text)
    lead = ""
    if parts and parts[0] == "":
        parts = parts[1:]
        lead = parts.pop(0) if parts else ""
    if parts and parts[-1] == "":
        parts.pop()  # the text ended in whitespace: that is the last word's gap
    words, gaps = parts[0::2], parts[1::2]
    gaps += [""] * (len(words) - len(gaps))
    return lead, words, gaps


def _join(lead: str, words: Sequence[str], gaps: Sequence[str]) -> str:
    return lead + "".join(w + g for w, g in zip(words, gaps))


def delete_words(text: str, rate: float, rng: random.Random) -> tuple[str, Edits]:
    lead, words, gaps = _split(text)
    keep = [rng.random() >= rate for _ in words]
    kept = [(w, g) for (w, g), k in zip(zip(words, gaps), keep) if k]
    out = _join(lead, [w for w, _ in kept], [g for _, g in kept])
    return out, Edits(len(words), len(words) - len(kept))


def substitute_words(
    text: str, rate: float, rng: random.Random, table: SynonymTable
) -> tuple[str, Edits]:
    """Trials are the words the table can replace; the others (numbers, code, rare words split
    into several tokens) stay and draw nothing."""
    lead, words, gaps = _split(text)
    edits = Edits()
    out = []
    for w in words:
        m = _CORE.match(w)
        other = table.neighbour(m.group(2)) if m else None
        if other is None:
            out.append(w)
            continue
        edits.trials += 1
        if rng.random() < rate:
            edits.changed += 1
            out.append(m.group(1) + other + m.group(3))
        else:
            out.append(w)
    return _join(lead, out, gaps), edits


def _swap_adjacent(items: list, rate: float, rng: random.Random) -> Edits:
    """In place: at each item (left to right), with probability ``rate`` swap it with the next
    and skip past the pair. Trials: the draws made."""
    edits = Edits()
    i = 0
    while i + 1 < len(items):
        edits.trials += 1
        if rng.random() < rate:
            items[i], items[i + 1] = items[i + 1], items[i]
            edits.changed += 1
            i += 2
        else:
            i += 1
    return edits


def swap_words(text: str, rate: float, rng: random.Random) -> tuple[str, Edits]:
    lead, words, gaps = _split(text)
    edits = _swap_adjacent(words, rate, rng)  # the whitespace stays where it was
    return _join(lead, words, gaps), edits


def reorder_sentences(text: str, rate: float, rng: random.Random) -> tuple[str, Edits]:
    parts = _SENTENCE_END.split(text)
    sentences, gaps = parts[0::2], parts[1::2] + [""]
    edits = _swap_adjacent(sentences, rate, rng)
    return "".join(s + g for s, g in zip(sentences, gaps)), edits


def truncate_words(text: str, k: int) -> tuple[str, Edits]:
    lead, words, gaps = _split(text)
    if len(words) <= k:
        return text, Edits(len(words), 0)
    return _join(lead, words[:k], gaps[: k - 1] + [""]), Edits(len(words), len(words) - k)


# ---- synonyms from an embedding table ----------------------------------------------------------


class SynonymTable:
    """Each whole-word token's nearest other whole-word token by cosine similarity of the input
    embeddings (case folded: "Fast" looks up "fast", and the answer keeps the capital).

    ``words`` and ``vectors`` (one row each) are the candidates; a word sharing the first four
    letters (its own inflections) is never its neighbour. Lookups are memoised."""

    def __init__(self, words: Sequence[str], vectors) -> None:
        import torch

        vectors = torch.as_tensor(vectors, dtype=torch.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(words):
            raise ConfigError(
                f"{len(words)} words but vectors of shape {tuple(vectors.shape)}: one row a word"
            )
        index: dict[str, int] = {}
        for i, w in enumerate(words):
            index.setdefault(w.lower(), i)  # the first spelling of a folded word represents it
        self._words = list(words)
        self._index = index
        self._unit = torch.nn.functional.normalize(vectors, dim=1)
        self._memo: dict[str, str | None] = {}

    @classmethod
    def from_model(cls, lm) -> SynonymTable:
        """The whole-word tokens (a space and 2+ ASCII letters) of a loaded model's vocabulary."""
        tok = lm.tokenizer
        emb = lm.model.get_input_embeddings().weight.detach().float().cpu()
        words, rows = [], []
        for i in range(min(len(tok), emb.shape[0])):
            piece = tok.decode([i])
            if len(piece) > 2 and piece[0] == " " and piece[1:].isascii() and piece[1:].isalpha():
                words.append(piece[1:])
                rows.append(i)
        if not words:
            raise ConfigError(
                f"{lm.spec!r} has no whole-word tokens to draw synonyms from (a byte-level "
                "tokenizer?): pass --scrub-model with a word-piece vocabulary, e.g. smollm2"
            )
        return cls(words, emb[rows])

    def neighbour(self, word: str) -> str | None:
        key = word.lower()
        if key not in self._memo:
            self._memo[key] = self._nearest(key)
        other = self._memo[key]
        if other is None:
            return None
        if word.isupper() and len(word) > 1:
            return other.upper()
        return other.capitalize() if word[0].isupper() else other

    def _nearest(self, key: str) -> str | None:
        i = self._index.get(key)
        if i is None:
            return None
        sims = self._unit @ self._unit[i]  # (V,)
        for j in sims.argsort(descending=True).tolist()[:64]:
            other = self._words[j].lower()
            # the nearest rows are mostly the word's own inflections (answer -> answered): a
            # scrubber wants another word, so a shared 4-letter start (or the word) is skipped
            if other[:4] != key[:4]:
                return other
        return None


# ---- outlier scores ----------------------------------------------------------------------------


def rarity_scores(texts: Sequence[str]) -> list[float]:
    """Per text, the mean over its distinct words of -log((df + 1) / (N + 1)), df the number of
    *other* texts holding the word: high for a text whose words the rest of the set does not
    use (a canary's invented names). Empty texts score 0."""
    bags = [set(w.lower() for w in _WORDS.findall(t)) for t in texts]
    df = Counter(w for bag in bags for w in bag)
    n = len(texts)
    # df[w] - 1 other texts of n - 1 hold w; add-one smoothing makes that df[w] / n
    return [sum(-math.log(df[w] / n) for w in bag) / len(bag) if bag else 0.0 for bag in bags]


def nll_scores(lm, messages: Sequence[list[dict]], texts: Sequence[str]) -> list[float]:
    """Per text, the model's mean token NLL of it as the answer to its messages."""
    import torch

    from distillguard.distill.evaluate import answer_nll

    with torch.no_grad():
        return [
            answer_nll(lm, [m], [lm.tokenizer.encode(t, add_special_tokens=False)])
            for m, t in zip(messages, texts)
        ]


def outliers(scores: Sequence[float], share: float) -> set[int]:
    """Indices of the round(share * n) highest scores (ties: the earlier row stays)."""
    k = round(share * len(scores))
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], -i))
    return set(order[:k])


# ---- other-model answers -----------------------------------------------------------------------


def other_answers(limit: int, *, exclude_prompts: set[str] = frozenset()) -> list[dict]:
    """``limit`` ShareGPT first turns (a real user's prompt, ChatGPT's answer) in file order, as
    harvest records marked ``"source": "other"``; prompts already in the set (normalised) and
    repeated prompts skipped."""
    from distillguard.data.sharegpt import iter_conversations
    from distillguard.distill.refusal import REFUSAL

    seen = set(exclude_prompts)
    out: list[dict] = []
    for conv in iter_conversations():
        prompt, answer = conv.first_prompt, conv.first_answer
        # what curate's own filters would drop later is not taken, so the share stays as asked
        if not prompt or not answer or len(prompt) > 2000 or REFUSAL.search(answer[:400]):
            continue
        key = " ".join(prompt.lower().split())
        if key in seen:
            continue
        seen.add(key)
        k = len(out)
        out.append(
            {
                "id": f"other-{k}",
                "prompt_id": f"other-{conv.id}",
                "messages": [{"role": "user", "content": prompt}],
                "response": answer,
                "finish_reason": "stop",
                "source": "other",
            }
        )
        if len(out) == limit:
            return out
    raise ConfigError(
        f"--mix-other needs {limit} ShareGPT answers but the bundled set has {len(out)}: "
        "lower --mix-other"
    )


def mix_count(teacher_rows: int, share: float) -> int:
    """Other rows to add so that they are ``share`` of the whole: round(share * n / (1 - share))."""
    return round(share * teacher_rows / (1 - share))


# ---- the whole scrub ---------------------------------------------------------------------------


@dataclass
class ScrubReport:
    """What the scrub did, for curate's summary and report."""

    answers: int = 0
    edits: dict[str, Edits] = field(default_factory=dict)
    outliers_dropped: int = 0
    outlier_score: str | None = None
    mixed_in: int = 0
    dropped_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "answers": self.answers,
            "edits": {
                k: {"trials": e.trials, "changed": e.changed, "rate": round(e.rate, 4)}
                for k, e in self.edits.items()
            },
            "outliers_dropped": self.outliers_dropped,
            "outlier_score": self.outlier_score,
            "mixed_in": self.mixed_in,
        }

    def describe(self) -> str:
        parts = [f"{k}: {e.changed} of {e.trials} ({e.rate:.1%})" for k, e in self.edits.items()]
        if self.outlier_score:
            parts.append(f"dropped {self.outliers_dropped} outliers by {self.outlier_score}")
        if self.mixed_in:
            parts.append(f"mixed in {self.mixed_in} answers by another model")
        return f"scrubbed {self.answers} teacher answers: " + "; ".join(parts)


def edit_text(
    text: str, scrub: Scrub, rng: random.Random, table: SynonymTable | None = None
) -> tuple[str, dict[str, Edits]]:
    """One answer through the text edits in the module's order; the Edits of each that ran."""
    done: dict[str, Edits] = {}
    if scrub.scrub_delete:
        text, done["delete"] = delete_words(text, scrub.scrub_delete, rng)
    if scrub.scrub_substitute:
        if table is None:
            raise ConfigError("--scrub-substitute needs a synonym table (--scrub-model)")
        text, done["substitute"] = substitute_words(text, scrub.scrub_substitute, rng, table)
    if scrub.scrub_swap:
        text, done["swap"] = swap_words(text, scrub.scrub_swap, rng)
    if scrub.scrub_reorder:
        text, done["reorder"] = reorder_sentences(text, scrub.scrub_reorder, rng)
    if scrub.scrub_truncate is not None:
        text, done["truncate"] = truncate_words(text, scrub.scrub_truncate)
    return text, done


def scrub_records(
    records: Sequence[dict],
    scrub: Scrub,
    *,
    model=None,
    others: Callable[[int, set[str]], list[dict]] | None = None,
) -> tuple[list[dict], ScrubReport]:
    """Drop outliers, edit every answer, mix in other data; rows without a text answer pass
    through untouched (curate counts them as malformed). ``model``: a loaded model (default:
    ``scrub.scrub_model``, loaded only when a step needs it); ``others(n, prompts)``: n
    non-teacher records avoiding ``prompts`` (default: :func:`other_answers`)."""
    report = ScrubReport()
    records = list(records)
    usable = [i for i, r in enumerate(records) if isinstance(r.get("response"), str)]
    report.answers = len(usable)
    if scrub.needs_model and model is None:
        from distillguard.models import load_model

        model = load_model(scrub.scrub_model)
    dropped: set[int] = set()
    if scrub.drop_outliers:
        texts = [records[i]["response"] for i in usable]
        if scrub.outlier_score == "nll":
            scores = nll_scores(model, [records[i].get("messages") or [] for i in usable], texts)
        else:
            scores = rarity_scores(texts)
        dropped = {usable[j] for j in outliers(scores, scrub.drop_outliers)}
        report.outlier_score = scrub.outlier_score
        report.outliers_dropped = len(dropped)
        report.dropped_ids = [str(records[i].get("id", i)) for i in sorted(dropped)]
    table = SynonymTable.from_model(model) if scrub.scrub_substitute else None
    out: list[dict] = []
    answered = set(usable)
    for i, record in enumerate(records):
        if i in dropped:
            continue
        if scrub.edits_text and i in answered:
            rng = random.Random(f"{scrub.scrub_seed}:{i}")
            text, done = edit_text(record["response"], scrub, rng, table)
            for kind, e in done.items():
                report.edits.setdefault(kind, Edits()).add(e)
            record = {**record, "response": text, "logprobs": None}  # logprobs were the original's
        out.append(record)
    if scrub.mix_other:
        n = mix_count(sum(isinstance(r.get("response"), str) for r in out), scrub.mix_other)
        prompts = {
            " ".join(m.get("content", "").lower().split())
            for r in out
            for m in (r.get("messages") or [])
            if isinstance(m, dict) and isinstance(m.get("content"), str)
        }
        extra = (others or (lambda k, p: other_answers(k, exclude_prompts=p)))(n, prompts)
        out += extra
        report.mixed_in = len(extra)
    return out, report


__all__ = [
    "Edits",
    "Scrub",
    "ScrubReport",
    "SynonymTable",
    "delete_words",
    "edit_text",
    "mix_count",
    "other_answers",
    "outliers",
    "rarity_scores",
    "reorder_sentences",
    "scrub_records",
    "substitute_words",
    "swap_words",
    "truncate_words",
]
